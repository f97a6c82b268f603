//! A fuzz corpus: valid requests with fields mutated to extreme, malformed or random values.
//! Seeded, so a failure names a case that can be sent again.

use bytes::Bytes;
use expertmesh_core::rng::SplitMix64;
use expertmesh_core::ModelSpec;
use expertmesh_proto::v1::{DType as PDType, ExpertBatch, ForwardRequest, Tensor};

fn pick<T: Copy>(r: &mut SplitMix64, v: &[T]) -> T {
    v[r.below(v.len() as u64) as usize]
}

fn extreme_u64(r: &mut SplitMix64, sane: u64) -> u64 {
    let any = r.next_u64();
    pick(r, &[0, 1, sane, sane + 1, sane.saturating_sub(1), 1 << 31, 1 << 56, u64::MAX, any])
}

fn extreme_u32(r: &mut SplitMix64, sane: u32) -> u32 {
    let any = r.next_u64() as u32;
    pick(r, &[0, 1, sane, sane.wrapping_add(1), u32::MAX, 1 << 31, any])
}

fn dtype(r: &mut SplitMix64) -> i32 {
    pick(r, &[0, 1, 2, 3, 4, 5, 6, -1, 1 << 30])
}

/// Bytes of `n` f32 values, some non-finite when `poison`.
fn f32_bytes(r: &mut SplitMix64, n: usize, poison: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * 4);
    for i in 0..n {
        let x =
            if poison && i % 7 == 3 { pick(r, &[f32::NAN, f32::INFINITY, -f32::INFINITY]) } else { r.normal() as f32 };
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// `n` mutated Forward requests, with a label each.
pub fn forward_cases(spec: &ModelSpec, n: usize, seed: u64) -> Vec<(String, ForwardRequest)> {
    let mut r = SplitMix64::new(seed);
    let moe = spec.moe_layers();
    (0..n)
        .map(|i| {
            let tokens = 1 + r.below(8) as usize;
            let mut what = Vec::new();
            let mut layer = moe[r.below(moe.len() as u64) as usize] as u32;
            let mut shape = vec![tokens as u64, spec.hidden as u64];
            let mut dt = PDType::DtypeF32 as i32;
            let mut poison = false;
            let mut data_len: Option<usize> = None;
            let mut ids: Option<Tensor> = Some(Tensor {
                dtype: PDType::DtypeI64 as i32,
                shape: vec![tokens as u64],
                data: Bytes::from((0..tokens).flat_map(|t| (t as i64).to_le_bytes()).collect::<Vec<u8>>()),
            });
            let mut wire = 0;
            // One to three mutations per case.
            for _ in 0..1 + r.below(3) {
                match r.below(8) {
                    0 => {
                        layer = extreme_u32(&mut r, layer);
                        what.push(format!("layer {layer}"));
                    }
                    1 => {
                        let dims = r.below(4) as usize;
                        shape = (0..dims).map(|_| extreme_u64(&mut r, spec.hidden as u64)).collect();
                        what.push(format!("shape {shape:?}"));
                    }
                    2 => {
                        dt = dtype(&mut r);
                        what.push(format!("dtype {dt}"));
                    }
                    3 => {
                        poison = true;
                        what.push("non-finite values".into());
                    }
                    4 => {
                        let sane = tokens * spec.hidden * 4;
                        let l = pick(&mut r, &[0, 1, sane - 1, sane + 1, sane * 2, 3]);
                        data_len = Some(l);
                        what.push(format!("{l} data bytes"));
                    }
                    5 => {
                        ids = match r.below(4) {
                            0 => None,
                            1 => Some(Tensor {
                                dtype: dtype(&mut r),
                                shape: vec![extreme_u64(&mut r, tokens as u64)],
                                data: Bytes::from(vec![0xff; 8 * tokens]),
                            }),
                            2 => Some(Tensor {
                                dtype: PDType::DtypeI64 as i32,
                                shape: vec![tokens as u64],
                                data: Bytes::from(
                                    (0..tokens).flat_map(|_| (r.next_u64() as i64).to_le_bytes()).collect::<Vec<u8>>(),
                                ),
                            }),
                            _ => Some(Tensor { dtype: PDType::DtypeI64 as i32, shape: vec![], data: Bytes::new() }),
                        };
                        what.push("input_ids".into());
                    }
                    6 => {
                        wire = dtype(&mut r);
                        what.push(format!("wire dtype {wire}"));
                    }
                    _ => {
                        shape = vec![extreme_u64(&mut r, tokens as u64), spec.hidden as u64];
                        what.push(format!("tokens {}", shape[0]));
                    }
                }
            }
            let n_vals = (tokens * spec.hidden).min(1 << 16);
            let mut data = f32_bytes(&mut r, n_vals, poison);
            if let Some(l) = data_len {
                data.resize(l.min(1 << 20), 0);
            }
            let req = ForwardRequest {
                layer,
                hidden_states: if r.below(20) == 0 {
                    None
                } else {
                    Some(Tensor { dtype: dt, shape, data: Bytes::from(data) })
                },
                input_ids: ids,
                wire_dtype: wire,
            };
            (format!("forward case {i}: {}", what.join(", ")), req)
        })
        .collect()
}

/// `n` mutated Compute streams (1 to 4 chunks each), with a label each.
pub fn compute_cases(spec: &ModelSpec, n: usize, seed: u64) -> Vec<(String, Vec<ExpertBatch>)> {
    let mut r = SplitMix64::new(seed);
    let moe = spec.moe_layers();
    (0..n)
        .map(|i| {
            let chunks = 1 + r.below(4) as u32;
            let mut what = Vec::new();
            let stream = (0..chunks)
                .map(|c| {
                    let rows = 1 + r.below(4) as u32;
                    let mut b = ExpertBatch {
                        request_id: r.next_u64(),
                        epoch: r.below(5),
                        layer: moe[r.below(moe.len() as u64) as usize] as u32,
                        dtype: PDType::DtypeF32 as i32,
                        hidden: spec.hidden as u32,
                        experts: vec![r.below(spec.n_routed as u64) as u32],
                        rows: vec![rows],
                        data: Bytes::new(),
                        chunk: c,
                    };
                    let mut poison = false;
                    let mut data_rows = rows as usize;
                    if r.below(3) == 0 {
                        match r.below(9) {
                            0 => b.chunk = extreme_u32(&mut r, c),
                            1 => b.dtype = dtype(&mut r),
                            2 => b.hidden = extreme_u32(&mut r, spec.hidden as u32),
                            3 => b.layer = extreme_u32(&mut r, b.layer),
                            4 => b.experts = vec![extreme_u32(&mut r, spec.n_routed as u32)],
                            5 => b.rows = vec![extreme_u32(&mut r, rows); 1 + r.below(3) as usize],
                            6 => poison = true,
                            7 => data_rows = r.below(6) as usize,
                            _ => b.experts.push(0),
                        }
                        what.push(format!("chunk {c} mutated"));
                    }
                    b.data = Bytes::from(f32_bytes(&mut r, data_rows * spec.hidden, poison));
                    b
                })
                .collect();
            (format!("compute case {i}: {} chunks, {}", chunks, what.join(", ")), stream)
        })
        .collect()
}
