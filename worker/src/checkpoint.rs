//! Checkpoint loading: `config.json` plus safetensors (one file, or sharded with
//! `model.safetensors.index.json`), memory-mapped; a worker reads only the tensors of the
//! experts it holds. bf16, f16, f32 and FP8 e4m3 with 128x128 `weight_scale_inv` block scales.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use expertmesh_core::dtype::{decode_f32, DType};
use expertmesh_core::gating::HashTable;
use expertmesh_core::{Family, ModelSpec, Proj};
use expertmesh_kernels::FfnWeights;
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;

use crate::error::{Result, WorkerError};

#[derive(Debug)]
struct ShardFile {
    path: PathBuf,
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
}

fn ck_err(msg: impl Into<String>) -> WorkerError {
    WorkerError::Checkpoint(msg.into())
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
            files.push(ShardFile { path, map, data_start });
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

    fn raw(&self, name: &str) -> Result<(DType, &[usize], &[u8], &Path)> {
        let (fi, info) = self
            .tensors
            .get(name)
            .ok_or_else(|| ck_err(format!("{}: tensor `{name}` is missing", self.dir.display())))?;
        let f = &self.files[*fi];
        let dtype = DType::from_safetensors(info.dtype)
            .map_err(|e| ck_err(format!("{}: tensor `{name}`: {e}", f.path.display())))?;
        let (a, b) = info.data_offsets;
        let bytes = &f.map[f.data_start + a..f.data_start + b];
        let n: usize = info.shape.iter().product();
        if bytes.len() != n * dtype.size() {
            return Err(ck_err(format!(
                "{}: tensor `{name}` has {} bytes; shape {:?} of {} needs {}",
                f.path.display(),
                bytes.len(),
                info.shape,
                dtype.name(),
                n * dtype.size()
            )));
        }
        Ok((dtype, &info.shape, bytes, &f.path))
    }

    /// Read a float tensor as f32, checking its shape; FP8 tensors are dequantised with their
    /// `<name>_scale_inv` block scales.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (dtype, shape, bytes, path) = self.raw(name)?;
        if !dtype.is_float() {
            return Err(ck_err(format!(
                "{}: tensor `{name}` has dtype {}; expected a float dtype (f32, bf16, f16, f8_e4m3)",
                path.display(),
                dtype.name()
            )));
        }
        if shape != expected {
            return Err(ck_err(format!(
                "{}: tensor `{name}` has shape {shape:?}; expected {expected:?}",
                path.display()
            )));
        }
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
        let (dtype, shape, bytes, path) = self.raw(name)?;
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

    fn load_ffn(&self, name: impl Fn(Proj) -> String, ffn: usize) -> Result<FfnWeights> {
        let s = &self.spec;
        let limit = if s.family == Family::DeepseekV4 { s.swiglu_limit.map(|l| l as f32) } else { None };
        Ok(FfnWeights {
            hidden: s.hidden,
            ffn,
            w1: self.read_f32(&name(Proj::Gate), &s.proj_shape(Proj::Gate, ffn))?,
            w3: self.read_f32(&name(Proj::Up), &s.proj_shape(Proj::Up, ffn))?,
            w2: self.read_f32(&name(Proj::Down), &s.proj_shape(Proj::Down, ffn))?,
            swiglu_limit: limit,
        })
    }

    /// One routed expert's weights.
    pub fn load_expert(&self, layer: usize, expert: usize) -> Result<FfnWeights> {
        self.spec.check_moe_layer(layer)?;
        if expert >= self.spec.n_routed {
            return Err(WorkerError::InvalidInput(format!(
                "expert {expert} is out of range: layer {layer} has experts 0..{}",
                self.spec.n_routed
            )));
        }
        self.load_ffn(|p| self.spec.expert_weight_name(layer, expert, p), self.spec.moe_ffn)
    }

    /// The fused shared expert of `layer`, if the model has one.
    pub fn load_shared(&self, layer: usize) -> Result<Option<FfnWeights>> {
        if self.spec.n_shared == 0 {
            return Ok(None);
        }
        self.load_ffn(|p| self.spec.shared_weight_name(layer, p), self.spec.shared_ffn()).map(Some)
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
        Ok(GateWeights { weight, bias, hash })
    }
}
