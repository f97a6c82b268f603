//! `expertmesh gen-model`: a synthetic model in the upstream checkpoint layout (config.json +
//! safetensors, sharded per layer with model.safetensors.index.json), seeded random weights.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use expertmesh_core::config::{preset_config, PresetOverrides};
use expertmesh_core::dtype::{encode_f32, f32_to_fp8_e4m3, DType};
use expertmesh_core::rng::SplitMix64;
use expertmesh_core::{ModelSpec, Proj};
use safetensors::View;

use crate::error::{Result, WorkerError};

/// A tensor to write.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl View for &OwnedTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl OwnedTensor {
    pub fn from_f32(dtype: DType, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        let mut data = Vec::new();
        encode_f32(dtype, values, &mut data)?;
        Ok(Self { dtype, shape, data })
    }

    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Self {
        Self { dtype: DType::I64, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    pub fn from_i32(shape: Vec<usize>, values: &[i32]) -> Self {
        Self { dtype: DType::I32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
}

/// Write `tensors` as one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, OwnedTensor>) -> Result<()> {
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.clone(), v)), None, path)
        .map_err(|e| WorkerError::Internal(format!("writing {}: {e}", path.display())))
}

/// Options of `gen-model`.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub preset: String,
    pub overrides: PresetOverrides,
    /// Dtype of expert and shared-expert weights: bf16, f16, f32, or f8_e4m3 (deepseek_v3).
    pub dtype: DType,
    pub seed: u64,
    /// Refuse to write more than this many bytes.
    pub max_bytes: u64,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct GenSummary {
    pub spec: ModelSpec,
    pub files: usize,
    pub bytes: u64,
}

fn random_matrix(rng: &mut SplitMix64, rows: usize, cols: usize, std: f64) -> Vec<f32> {
    let a = std * 3f64.sqrt();
    (0..rows * cols).map(|_| rng.uniform(a) as f32).collect()
}

/// Encode a weight matrix in `dtype`; FP8 adds `<name>_scale_inv` with 128x128 block scales.
fn put_weight(
    out: &mut BTreeMap<String, OwnedTensor>,
    name: String,
    dtype: DType,
    rows: usize,
    cols: usize,
    values: &[f32],
    block: (usize, usize),
) -> Result<()> {
    if dtype != DType::F8E4M3 {
        out.insert(name, OwnedTensor::from_f32(dtype, vec![rows, cols], values)?);
        return Ok(());
    }
    let (br, bc) = block;
    let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
    let mut scales = vec![0f32; sr * sc];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / br) * sc + c / bc];
            *s = s.max(values[r * cols + c].abs());
        }
    }
    for s in scales.iter_mut() {
        *s = if *s > 0.0 { *s / 448.0 } else { 1.0 };
    }
    let mut data = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            data.push(f32_to_fp8_e4m3(values[r * cols + c] / scales[(r / br) * sc + c / bc]));
        }
    }
    out.insert(format!("{name}_scale_inv"), OwnedTensor::from_f32(DType::F32, vec![sr, sc], &scales)?);
    out.insert(name, OwnedTensor { dtype: DType::F8E4M3, shape: vec![rows, cols], data });
    Ok(())
}

/// Bytes a generated checkpoint of `spec` takes in `dtype`.
pub fn estimate_bytes(spec: &ModelSpec, dtype: DType) -> u64 {
    let per_layer = (spec.n_routed as u64 * spec.expert_params() + 3 * (spec.hidden * spec.shared_ffn) as u64)
        * dtype.size() as u64
        + (spec.n_routed * spec.hidden * 4) as u64;
    per_layer * spec.moe_layers().len() as u64
}

/// Generate the model into `out_dir` (created if missing).
pub fn generate(out_dir: &Path, opts: &GenOptions) -> Result<GenSummary> {
    generate_with_progress(out_dir, opts, &mut |_, _| {})
}

/// [`generate`], telling `progress(bytes written or built so far, bytes in all)` after every
/// expert.
pub fn generate_with_progress(
    out_dir: &Path,
    opts: &GenOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GenSummary> {
    let mut ov = opts.overrides.clone();
    if opts.dtype == DType::F8E4M3 {
        ov.fp8 = Some(true);
    }
    if !opts.dtype.is_float() {
        return Err(WorkerError::InvalidInput(format!(
            "--dtype {} is not a weight dtype; expected bf16, f16, f32 or f8_e4m3",
            opts.dtype.name()
        )));
    }
    let cfg = preset_config(&opts.preset, &ov)?;
    let spec = ModelSpec::from_config_json(&cfg.to_string())?;
    let total = estimate_bytes(&spec, opts.dtype);
    if total > opts.max_bytes {
        return Err(WorkerError::InvalidInput(format!(
            "preset {} would write {:.1} GiB of weights (limit {:.1} GiB); scale it down with --layers, --experts, --hidden or --ffn, or raise --max-gib",
            opts.preset,
            total as f64 / (1u64 << 30) as f64,
            opts.max_bytes as f64 / (1u64 << 30) as f64
        )));
    }
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).map_err(|e| WorkerError::Internal(e.to_string()))?,
    )?;
    // Remove shards of an earlier run so the directory holds exactly this model.
    for entry in std::fs::read_dir(out_dir)?.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.ends_with(".safetensors") || n == "model.safetensors.index.json" {
            std::fs::remove_file(entry.path())?;
        }
    }
    let layers = spec.moe_layers();
    let nfiles = layers.len();
    let mut weight_map = serde_json::Map::new();
    let mut bytes = 0u64;
    let block = spec.fp8_block.unwrap_or((128, 128));
    let (h, f, e) = (spec.hidden, spec.moe_ffn, spec.n_routed);
    for (i, &l) in layers.iter().enumerate() {
        let mut rng = SplitMix64::new(opts.seed.wrapping_mul(1_000_003).wrapping_add(l as u64));
        let mut t = BTreeMap::new();
        // Router weights stay in a plain float dtype, as upstream checkpoints keep them.
        let gate_dtype = if opts.dtype == DType::F8E4M3 { DType::BF16 } else { opts.dtype };
        let gate = random_matrix(&mut rng, e, h, 1.0 / (h as f64).sqrt());
        t.insert(spec.gate_weight_name(l), OwnedTensor::from_f32(gate_dtype, vec![e, h], &gate)?);
        if spec.has_gate_bias(l) {
            let bias: Vec<f32> = (0..e).map(|_| rng.uniform(0.05) as f32).collect();
            t.insert(spec.gate_bias_name(l), OwnedTensor::from_f32(DType::F32, vec![e], &bias)?);
        }
        if spec.is_hash_layer(l) {
            let k = spec.top_k;
            let mut ids = Vec::with_capacity(spec.vocab_size * k);
            for _ in 0..spec.vocab_size {
                let mut row: Vec<i32> = Vec::with_capacity(k);
                while row.len() < k {
                    let x = rng.below(e as u64) as i32;
                    if !row.contains(&x) {
                        row.push(x);
                    }
                }
                ids.extend(row);
            }
            t.insert(spec.tid2eid_name(l), OwnedTensor::from_i32(vec![spec.vocab_size, k], &ids));
        }
        let mut ffn =
            |t: &mut BTreeMap<String, OwnedTensor>, name: &dyn Fn(Proj) -> String, size: usize| -> Result<()> {
                for p in Proj::ALL {
                    let [r, c] = spec.proj_shape(p, size);
                    let std = if p == Proj::Down { 1.0 / (size as f64).sqrt() } else { 1.5 / (h as f64).sqrt() };
                    let w = random_matrix(&mut rng, r, c, std);
                    put_weight(t, name(p), opts.dtype, r, c, &w, block)?;
                }
                Ok(())
            };
        for x in 0..e {
            ffn(&mut t, &|p| spec.expert_weight_name(l, x, p), f)?;
            let built: u64 = t.values().map(|x| x.data.len() as u64).sum();
            progress((bytes + built).min(total), total);
        }
        if spec.n_shared > 0 {
            ffn(&mut t, &|p| spec.shared_weight_name(l, p), spec.shared_ffn)?;
        }
        if spec.shared_gate {
            // Qwen2-MoE: sigmoid(x . g) scales the shared expert per token; spread so it varies.
            let g = random_matrix(&mut rng, 1, h, 1.5 / (h as f64).sqrt());
            t.insert(spec.shared_gate_name(l), OwnedTensor::from_f32(gate_dtype, vec![1, h], &g)?);
        }
        let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, nfiles);
        for (name, tensor) in &t {
            bytes += tensor.data.len() as u64;
            weight_map.insert(name.clone(), serde_json::Value::String(fname.clone()));
        }
        write_safetensors(&out_dir.join(&fname), &t)?;
    }
    let index = serde_json::json!({"metadata": {"total_size": bytes}, "weight_map": weight_map});
    std::fs::write(
        out_dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).map_err(|e| WorkerError::Internal(e.to_string()))?,
    )?;
    Ok(GenSummary { spec, files: nfiles, bytes })
}
