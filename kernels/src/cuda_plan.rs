//! Host-side planning for device backends, built with or without the `cuda` feature so that it
//! is tested on every machine: the tile table of a grouped FFN launch, and the permutation that
//! takes a batch's rows into expert order and back (dispatch and combine on the device).

use expertmesh_core::dtype::DType;

use crate::{Groups, KernelError, Result};

/// Rows of one tile of the grouped FFN kernels (`BM` in `kernels/cuda/experts.cu`).
pub const TILE_ROWS: usize = 64;
/// Output columns of one tile (`BN`).
pub const TILE_COLS: usize = 64;

/// The tile table of a grouped launch: for every group, its rows in tiles of at most
/// [`TILE_ROWS`], each `[slot, first row, end row, 0]`, where `slot` indexes the layer's table
/// of resident experts (`slot_of(expert)`). Empty groups give no tile; the tiles cover every
/// row of the batch exactly once, so a kernel that runs every tile writes every output row.
pub fn tile_table(groups: &Groups, slot_of: impl Fn(u32) -> Option<u32>, layer: usize) -> Result<Vec<u32>> {
    let mut t = Vec::new();
    for (&e, w) in groups.experts.iter().zip(groups.offsets.windows(2)) {
        let slot = slot_of(e).ok_or(KernelError::NotResident { layer, expert: e })?;
        let mut r = w[0];
        while r < w[1] {
            let end = (r + TILE_ROWS).min(w[1]);
            let (a, b) = (u32::try_from(r), u32::try_from(end));
            let (Ok(a), Ok(b)) = (a, b) else {
                return Err(KernelError::Shape(format!("row {end} does not fit the kernels' 32-bit row index")));
            };
            t.extend_from_slice(&[slot, a, b, 0]);
            r = end;
        }
    }
    Ok(t)
}

/// The kernels' dtype codes (`DT_*` in `kernels/cuda/experts.cu`).
pub fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        _ => 3,
    }
}

/// The kernels' `Mat` for a weight matrix at device address `data` in `dtype`, with FP8 block
/// scales at `scales` (address, (block rows, block columns)): data and scale addresses, then
/// dtype, block rows, block columns and a zero, as four u64.
pub fn mat_descriptor(data: u64, scales: Option<(u64, (usize, usize))>, dtype: DType) -> [u64; 4] {
    let (sp, (br, bc)) = scales.unwrap_or((0, (1, 1)));
    [data, sp, dtype_code(dtype) as u32 as u64 | ((br as u32 as u64) << 32), bc as u32 as u64]
}

/// Device bytes of one expert of `hidden` x `ffn` stored in `dtype` (FP8: with its f32 block
/// scales, 128x128 blocks unless `block` says otherwise): the checkpoint's bytes, as uploaded.
pub fn device_expert_bytes(hidden: usize, ffn: usize, dtype: DType, block: Option<(usize, usize)>) -> u64 {
    let m = |r: usize, c: usize| {
        let scales = match (dtype, block) {
            (DType::F8E4M3, b) => {
                let (br, bc) = b.unwrap_or((128, 128));
                r.div_ceil(br.max(1)) * c.div_ceil(bc.max(1)) * 4
            }
            _ => 0,
        };
        (r * c * dtype.size() + scales) as u64
    };
    2 * m(ffn, hidden) + m(hidden, ffn)
}

/// The two launches of a grouped expert FFN: which kernel family, grid and block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FfnLaunch {
    /// `gateup_mma`/`down_mma` (tensor cores, bf16 intermediate) or `gateup_simt`/`down_simt`
    /// (f32 intermediate).
    pub tensor_cores: bool,
    pub gateup_grid: (u32, u32, u32),
    pub down_grid: (u32, u32, u32),
    pub block: u32,
}

/// The launches for `ntiles` tiles of a layer of `hidden` x `ffn` experts on activations of
/// `x_dtype`; `bf16_weights`: every resident weight is bf16 or FP8 (tensor cores apply to bf16
/// activations then).
pub fn ffn_launch(x_dtype: DType, bf16_weights: bool, hidden: usize, ffn: usize, ntiles: usize) -> FfnLaunch {
    let tensor_cores = x_dtype == DType::BF16 && bf16_weights;
    let grid = |n: usize| (n.div_ceil(TILE_COLS) as u32, ntiles as u32, 1);
    FfnLaunch {
        tensor_cores,
        gateup_grid: grid(ffn),
        down_grid: grid(hidden),
        block: if tensor_cores { 128 } else { 256 },
    }
}

/// How the rows of a batch of `tokens` tokens, each routed to `k` experts, are laid out by
/// expert for one device and combined back.
#[derive(Debug, Clone, PartialEq)]
pub struct Permutation {
    /// Row `i` of the expert-ordered batch is token `gather[i]`.
    pub gather: Vec<u32>,
    /// The expert-ordered batch, grouped (experts ascending).
    pub groups: Groups,
    /// For token `t` and choice `j`: the expert-ordered row holding it (`slot[t k + j]`), or
    /// `u32::MAX` when that choice is not on this device.
    pub slot: Vec<u32>,
    /// Routing weight of each (token, choice), `weight[t k + j]`; 0 where `slot` is `u32::MAX`.
    pub weight: Vec<f32>,
}

impl Permutation {
    /// Rows of `tokens x k` routing (`experts[t k + j]` with `weights[t k + j]`) whose expert
    /// `here` accepts; stable within an expert (rows keep token order).
    pub fn build(experts: &[u32], weights: &[f32], k: usize, here: impl Fn(u32) -> bool) -> Result<Self> {
        if k == 0 || !experts.len().is_multiple_of(k) || weights.len() != experts.len() {
            return Err(KernelError::Shape(format!(
                "routing of {} expert ids and {} weights is not tokens x k (k = {k})",
                experts.len(),
                weights.len()
            )));
        }
        let mut order: Vec<(u32, u32)> = experts
            .iter()
            .enumerate()
            .filter(|(_, &e)| here(e))
            .map(|(i, &e)| (e, u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        if order.iter().any(|&(_, i)| i == u32::MAX) {
            return Err(KernelError::Shape("more routed rows than a 32-bit index holds".into()));
        }
        order.sort_by_key(|&(e, i)| (e, i));
        let mut slot = vec![u32::MAX; experts.len()];
        let mut weight = vec![0f32; experts.len()];
        let mut gather = Vec::with_capacity(order.len());
        let mut segments: Vec<(u32, usize)> = Vec::new();
        for (row, &(e, i)) in order.iter().enumerate() {
            gather.push(i / k as u32);
            slot[i as usize] = row as u32;
            weight[i as usize] = weights[i as usize];
            match segments.last_mut() {
                Some((last, n)) if *last == e => *n += 1,
                _ => segments.push((e, 1)),
            }
        }
        Ok(Self { gather, groups: Groups::from_counts(segments), slot, weight })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_row_once_and_skip_empty_groups() {
        let g = Groups::from_counts([(7, 0), (3, 130), (9, 1), (3, 64), (9, 0)]);
        let slots = |e: u32| [3u32, 7, 9].iter().position(|&x| x == e).map(|p| p as u32);
        let t = tile_table(&g, slots, 2).unwrap();
        let tiles: Vec<&[u32]> = t.chunks(4).collect();
        assert_eq!(
            tiles,
            [[0, 0, 64, 0], [0, 64, 128, 0], [0, 128, 130, 0], [2, 130, 131, 0], [0, 131, 195, 0]]
                .iter()
                .map(|x| &x[..])
                .collect::<Vec<_>>()
        );
        let mut covered = vec![0; g.rows()];
        for x in &tiles {
            assert!(x[2] > x[1] && (x[2] - x[1]) as usize <= TILE_ROWS);
            (x[1]..x[2]).for_each(|r| covered[r as usize] += 1);
        }
        assert!(covered.iter().all(|&c| c == 1));
        assert!(tile_table(&Groups::from_counts([]), slots, 2).unwrap().is_empty());
        let e = tile_table(&Groups::from_counts([(4, 1)]), slots, 2).unwrap_err();
        assert!(e.to_string().contains("layer 2 holds no expert 4"), "{e}");
    }

    #[test]
    fn permutation_groups_by_expert_and_inverts() {
        // 4 tokens, top-2; this device holds experts 1 and 3.
        let experts = [3, 1, 0, 3, 1, 2, 3, 0];
        let weights = [0.6, 0.4, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1];
        let p = Permutation::build(&experts, &weights, 2, |e| e == 1 || e == 3).unwrap();
        assert_eq!(p.groups.experts, [1, 3]);
        assert_eq!(p.groups.offsets, [0, 2, 5]);
        assert_eq!(p.gather, [0, 2, 0, 1, 3]);
        for (i, &e) in experts.iter().enumerate() {
            if e == 1 || e == 3 {
                let row = p.slot[i] as usize;
                assert_eq!(p.gather[row] as usize, i / 2, "choice {i} comes back to its token");
                assert_eq!(p.weight[i], weights[i]);
            } else {
                assert_eq!((p.slot[i], p.weight[i]), (u32::MAX, 0.0));
            }
        }
        let e = Permutation::build(&experts, &weights[..7], 2, |_| true).unwrap_err();
        assert!(e.to_string().contains("not tokens x k"), "{e}");
    }
}
