//! Checkpoint loading: `config.json` plus safetensors (one file, or sharded with
//! `model.safetensors.index.json`); a worker reads only the tensors of the experts it holds.
//! bf16, f16, f32 and FP8 e4m3 with 128x128 `weight_scale_inv` block scales.
//!
//! Expert weights come out in their stored dtype ([`Checkpoint::layer_weights`]), never
//! dequantised, read with `pread` so that the resident copy is the only one in the process's
//! memory. Small tensors (routers, scales) are read through a read-only memory map.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use expertmesh_core::dtype::{decode_f32, DType};
use expertmesh_core::gating::HashTable;
use expertmesh_core::{Family, ModelSpec, Proj};
use expertmesh_kernels::{BlockScales, ExpertWeights, LayerWeights, StoredMatrix};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;

use crate::error::{Error, Result};

#[derive(Debug)]
struct ShardFile {
    path: PathBuf,
    file: File,
    map: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    spec: ModelSpec,
    config_text: String,
    files: Vec<ShardFile>,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

/// A layer's router: weight [E, H], optional correction bias, optional hash table.
#[derive(Debug, Clone)]
pub struct GateWeights {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub hash: Option<HashTable>,
    /// Qwen2-MoE: the shared expert's gate [hidden]; its output is scaled by sigmoid(x . g).
    pub shared_gate: Option<Vec<f32>>,
}

fn ck_err(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

impl Checkpoint {
    /// Open `dir`: parse config.json and the safetensors headers; no tensor data is read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("config.json");
        let config_text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| ck_err(format!("cannot read {}: {e}", cfg_path.display())))?;
        let spec =
            ModelSpec::from_config_json(&config_text).map_err(|e| ck_err(format!("{}: {e}", cfg_path.display())))?;
        let index_path = dir.join("model.safetensors.index.json");
        let mut names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ck_err(format!("{}: not valid JSON: {e}", index_path.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ck_err(format!("{}: missing `weight_map`", index_path.display())))?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            files
        } else {
            let mut files: Vec<String> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            files.sort();
            files
        };
        if names.is_empty() {
            return Err(ck_err(format!("{}: no .safetensors files", dir.display())));
        }
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for name in names.drain(..) {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(|e| ck_err(format!("cannot open {}: {e}", path.display())))?;
            // SAFETY: the map is read-only and checkpoints are immutable while served; a file
            // truncated underneath us would fault, which is why deployments mount them read-only.
            #[allow(unsafe_code)]
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ck_err(format!("cannot map {}: {e}", path.display())))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| ck_err(format!("{}: bad safetensors header: {e}", path.display())))?;
            let data_start = 8 + header_len;
            let data_len = map.len() - data_start.min(map.len());
            for (tname, info) in meta.tensors() {
                if info.data_offsets.1 > data_len {
                    return Err(ck_err(format!(
                        "{}: tensor `{tname}` ends at byte {} but the file's data section has {data_len} bytes (truncated file?)",
                        path.display(),
                        info.data_offsets.1
                    )));
                }
                tensors.insert(tname, (files.len(), info.clone()));
            }
            files.push(ShardFile { path, file, map, data_start });
        }
        Ok(Self { dir, spec, config_text, files, tensors })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tensor's file, dtype, info and data range in the file, its byte count checked
    /// against its shape.
    fn locate(&self, name: &str) -> Result<(&ShardFile, DType, &TensorInfo, Range<usize>)> {
        let (fi, info) = self
            .tensors
            .get(name)
            .ok_or_else(|| ck_err(format!("{}: tensor `{name}` is missing", self.dir.display())))?;
        let f = &self.files[*fi];
        let dtype = DType::from_safetensors(info.dtype)
            .map_err(|e| ck_err(format!("{}: tensor `{name}`: {e}", f.path.display())))?;
        let (a, b) = info.data_offsets;
        let n: usize = info.shape.iter().product();
        if b - a != n * dtype.size() {
            return Err(ck_err(format!(
                "{}: tensor `{name}` has {} bytes; shape {:?} of {} needs {}",
                f.path.display(),
                b - a,
                info.shape,
                dtype.name(),
                n * dtype.size()
            )));
        }
        Ok((f, dtype, info, f.data_start + a..f.data_start + b))
    }

    /// [`Self::locate`] for a float tensor of shape `expected`.
    fn float_tensor(&self, name: &str, expected: &[usize]) -> Result<(&ShardFile, DType, Range<usize>)> {
        let (f, dtype, info, range) = self.locate(name)?;
        if !dtype.is_float() {
            return Err(ck_err(format!(
                "{}: tensor `{name}` has dtype {}; expected a float dtype (f32, bf16, f16, f8_e4m3)",
                f.path.display(),
                dtype.name()
            )));
        }
        if info.shape != expected {
            return Err(ck_err(format!(
                "{}: tensor `{name}` has shape {:?}; expected {expected:?}",
                f.path.display(),
                info.shape
            )));
        }
        Ok((f, dtype, range))
    }

    /// Read a float tensor as f32, checking its shape; FP8 tensors are dequantised with their
    /// `<name>_scale_inv` block scales.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (f, dtype, range) = self.float_tensor(name, expected)?;
        let (bytes, shape) = (&f.map[range], expected);
        let mut out = vec![0f32; shape.iter().product()];
        decode_f32(dtype, bytes, &mut out).map_err(|e| ck_err(format!("`{name}`: {e}")))?;
        if dtype == DType::F8E4M3 {
            if shape.len() != 2 {
                return Err(ck_err(format!("FP8 tensor `{name}` must be 2-D, has shape {shape:?}")));
            }
            let (br, bc) = self.spec.fp8_block.unwrap_or((128, 128));
            let (rows, cols) = (shape[0], shape[1]);
            let sname = format!("{name}_scale_inv");
            let scales = self.read_f32(&sname, &[rows.div_ceil(br), cols.div_ceil(bc)])?;
            let scols = cols.div_ceil(bc);
            for (r, row) in out.chunks_exact_mut(cols).enumerate() {
                let srow = &scales[(r / br) * scols..(r / br + 1) * scols];
                for (c, v) in row.iter_mut().enumerate() {
                    *v *= srow[c / bc];
                }
            }
        }
        Ok(out)
    }

    /// Read an integer tensor (i64 or i32) as i64, checking its shape.
    pub fn read_i64(&self, name: &str, expected: &[usize]) -> Result<Vec<i64>> {
        let (f, dtype, info, range) = self.locate(name)?;
        let (shape, bytes, path) = (&info.shape, &f.map[range], &f.path);
        if shape != expected {
            return Err(ck_err(format!(
                "{}: tensor `{name}` has shape {shape:?}; expected {expected:?}",
                path.display()
            )));
        }
        match dtype {
            DType::I64 => {
                Ok(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
            }
            DType::I32 => {
                Ok(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect())
            }
            other => Err(ck_err(format!(
                "{}: tensor `{name}` has dtype {}; expected i64 or i32",
                path.display(),
                other.name()
            ))),
        }
    }

    /// A weight matrix in its stored dtype, checked against `expected` `[rows, cols]`; FP8
    /// brings its `<name>_scale_inv` block scales.
    pub fn stored_matrix(&self, name: &str, expected: [usize; 2]) -> Result<StoredMatrix<'static>> {
        let (f, dtype, range) = self.float_tensor(name, &expected)?;
        let mut data = vec![0u8; range.len()];
        f.file
            .read_exact_at(&mut data, range.start as u64)
            .map_err(|e| ck_err(format!("{}: reading tensor `{name}`: {e}", f.path.display())))?;
        let scales = if dtype == DType::F8E4M3 {
            let block = self.spec.fp8_block.unwrap_or((128, 128));
            let sname = format!("{name}_scale_inv");
            let values = self.read_f32(&sname, &[expected[0].div_ceil(block.0), expected[1].div_ceil(block.1)])?;
            Some(BlockScales { block, values })
        } else {
            None
        };
        Ok(StoredMatrix { dtype, rows: expected[0], cols: expected[1], data: Cow::Owned(data), scales })
    }

    fn ffn_weights(&self, expert: u32, name: impl Fn(Proj) -> String, ffn: usize) -> Result<ExpertWeights<'static>> {
        let s = &self.spec;
        let m = |p: Proj| self.stored_matrix(&name(p), s.proj_shape(p, ffn));
        Ok(ExpertWeights { expert, w1: m(Proj::Gate)?, w3: m(Proj::Up)?, w2: m(Proj::Down)? })
    }

    fn swiglu_limit(&self) -> Option<f32> {
        let s = &self.spec;
        if s.family == Family::DeepseekV4 {
            s.swiglu_limit.map(|l| l as f32)
        } else {
            None
        }
    }

    /// Routed experts `experts` of `layer`, in their stored dtype.
    pub fn layer_weights(&self, layer: usize, experts: &[u32]) -> Result<LayerWeights<'static>> {
        self.spec.check_moe_layer(layer)?;
        let s = &self.spec;
        let mut out = Vec::with_capacity(experts.len());
        for &e in experts {
            if e as usize >= s.n_routed {
                return Err(Error::InvalidInput(format!(
                    "expert {e} is out of range: layer {layer} has experts 0..{}",
                    s.n_routed
                )));
            }
            out.push(self.ffn_weights(e, |p| s.expert_weight_name(layer, e as usize, p), s.moe_ffn)?);
        }
        Ok(LayerWeights { layer, hidden: s.hidden, ffn: s.moe_ffn, swiglu_limit: self.swiglu_limit(), experts: out })
    }

    /// The shared expert of `layer` as a one-expert layer (expert 0), if the model has one.
    pub fn shared_weights(&self, layer: usize) -> Result<Option<LayerWeights<'static>>> {
        let s = &self.spec;
        if s.n_shared == 0 {
            return Ok(None);
        }
        let e = self.ffn_weights(0, |p| s.shared_weight_name(layer, p), s.shared_ffn)?;
        Ok(Some(LayerWeights {
            layer,
            hidden: s.hidden,
            ffn: s.shared_ffn,
            swiglu_limit: self.swiglu_limit(),
            experts: vec![e],
        }))
    }

    /// Checkpoint bytes of one routed expert of `layer` (weights and FP8 scales), from the
    /// headers: what a backend holds, since backends keep the stored dtype.
    pub fn expert_bytes(&self, layer: usize) -> Result<u64> {
        let s = &self.spec;
        s.check_moe_layer(layer)?;
        let mut total = 0u64;
        for p in [Proj::Gate, Proj::Up, Proj::Down] {
            let name = s.expert_weight_name(layer, 0, p);
            for n in [name.clone(), format!("{name}_scale_inv")] {
                if let Some((_, info)) = self.tensors.get(&n) {
                    total += (info.data_offsets.1 - info.data_offsets.0) as u64;
                } else if n == name {
                    return Err(ck_err(format!("{}: tensor `{name}` is missing", self.dir.display())));
                }
            }
        }
        Ok(total)
    }

    /// The router of `layer`.
    pub fn load_gate(&self, layer: usize) -> Result<GateWeights> {
        let s = &self.spec;
        s.check_moe_layer(layer)?;
        let weight = self.read_f32(&s.gate_weight_name(layer), &[s.n_routed, s.hidden])?;
        let bias =
            if s.has_gate_bias(layer) { Some(self.read_f32(&s.gate_bias_name(layer), &[s.n_routed])?) } else { None };
        let hash = if s.is_hash_layer(layer) {
            let name = s.tid2eid_name(layer);
            let ids = self.read_i64(&name, &[s.vocab_size, s.top_k])?;
            Some(HashTable::new(ids, s.vocab_size, s.top_k, s.n_routed).map_err(|e| ck_err(format!("`{name}`: {e}")))?)
        } else {
            None
        };
        let shared_gate =
            if s.shared_gate { Some(self.read_f32(&s.shared_gate_name(layer), &[1, s.hidden])?) } else { None };
        Ok(GateWeights { weight, bias, hash, shared_gate })
    }
}
