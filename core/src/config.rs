//! The model spec: what ExpertMesh needs to know of a MoE model, read from its upstream
//! `config.json` (DeepSeek V3, DeepSeek V4, Mixtral, Qwen2-MoE, Qwen3-MoE), plus presets with the real
//! shapes and the checkpoint's tensor names.

use serde_json::{json, Value};

use crate::error::{CoreError, Result};

/// Model families; they differ in routing and in checkpoint tensor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `deepseek_v3` (also V3.1/R1): sigmoid + correction bias, group-limited top-k,
    /// Hugging Face names `model.layers.{L}.mlp.*`.
    DeepseekV3,
    /// `deepseek_v4`: sqrt(softplus) + bias, hash-routed first layers, SwiGLU clamp,
    /// DeepSeek names `layers.{L}.ffn.*`.
    DeepseekV4,
    /// `mixtral`: softmax top-k, `model.layers.{L}.block_sparse_moe.*`, no shared expert.
    Mixtral,
    /// `qwen2_moe`: softmax top-k, `model.layers.{L}.mlp.*`, one shared expert
    /// (`mlp.shared_expert.*`, its own intermediate size) scaled per token by
    /// sigmoid(x . `mlp.shared_expert_gate.weight`).
    Qwen2Moe,
    /// `qwen3_moe`: softmax top-k, `model.layers.{L}.mlp.*`, no shared expert.
    Qwen3Moe,
}

/// Gate scoring function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Sigmoid,
    SqrtSoftplus,
    Softmax,
}

/// One of an expert's three projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    /// W1, `gate_proj`: [ffn, hidden].
    Gate,
    /// W3, `up_proj`: [ffn, hidden].
    Up,
    /// W2, `down_proj`: [hidden, ffn].
    Down,
}

impl Proj {
    pub const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];
}

/// Everything ExpertMesh needs to know of a MoE model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub model_type: String,
    pub family: Family,
    pub hidden: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    /// Intermediate size of one routed expert.
    pub moe_ffn: usize,
    pub n_routed: usize,
    /// Shared experts, fused into one FFN of intermediate size `shared_ffn` (0: none).
    pub n_shared: usize,
    /// Intermediate size of the fused shared expert: `moe_ffn * n_shared` for DeepSeek, Qwen2's
    /// `shared_expert_intermediate_size` (0: none).
    pub shared_ffn: usize,
    /// The shared expert's output is scaled per token by sigmoid(x . `shared_expert_gate`)
    /// (Qwen2-MoE).
    pub shared_gate: bool,
    pub top_k: usize,
    /// Expert groups (1: no group limit) and how many groups a token may use.
    pub n_group: usize,
    pub topk_group: usize,
    pub scoring: Scoring,
    pub norm_topk_prob: bool,
    pub routed_scaling: f64,
    /// Layers before this index are dense (no MoE).
    pub first_dense: usize,
    /// Layer L >= `first_dense` is MoE when `(L + moe_layer_offset) % moe_layer_freq == 0`:
    /// DeepSeek (`moe_layer_freq`) counts from layer 0; Qwen (`decoder_sparse_step`) from layer 1.
    pub moe_layer_freq: usize,
    pub moe_layer_offset: usize,
    /// Layers that are explicitly dense (Qwen3 `mlp_only_layers`).
    pub dense_layers: Vec<usize>,
    /// MoE layers routed by token id through `tid2eid` (V4's first layers).
    pub hash_layers: Vec<usize>,
    /// SwiGLU clamp (V4): gate <= limit, -limit <= up <= limit.
    pub swiglu_limit: Option<f64>,
    /// FP8 block-scale block size [rows, cols] when the checkpoint is FP8.
    pub fp8_block: Option<(usize, usize)>,
}

fn get_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| CoreError::Config(format!("`{key}` must be a non-negative integer, got {x}"))),
    }
}

fn need_usize(v: &Value, key: &str) -> Result<usize> {
    get_usize(v, key)?.ok_or_else(|| CoreError::Config(format!("missing required field `{key}`")))
}

fn get_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| CoreError::Config(format!("`{key}` must be a number, got {x}"))),
    }
}

fn get_bool(v: &Value, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => {
            x.as_bool().map(Some).ok_or_else(|| CoreError::Config(format!("`{key}` must be true or false, got {x}")))
        }
    }
}

impl ModelSpec {
    /// Parse an upstream `config.json`.
    pub fn from_config_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| CoreError::Config(format!("not valid JSON: {e}")))?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| CoreError::Config("missing `model_type`".into()))?
            .to_string();
        let family = match model_type.as_str() {
            "deepseek_v3" => Family::DeepseekV3,
            "deepseek_v4" => Family::DeepseekV4,
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            other => {
                return Err(CoreError::Config(format!(
                "unsupported model_type `{other}`; expected deepseek_v3, deepseek_v4, mixtral, qwen2_moe or qwen3_moe"
            )))
            }
        };
        let hidden = need_usize(&v, "hidden_size")?;
        let num_layers = need_usize(&v, "num_hidden_layers")?;
        let vocab_size = get_usize(&v, "vocab_size")?.unwrap_or(32000);
        let scoring_name = v.get("scoring_func").and_then(Value::as_str);
        let parse_scoring = |default: Scoring| -> Result<Scoring> {
            Ok(match scoring_name {
                None => default,
                Some("sigmoid") => Scoring::Sigmoid,
                Some("sqrtsoftplus") => Scoring::SqrtSoftplus,
                Some("softmax") => Scoring::Softmax,
                Some(other) => {
                    return Err(CoreError::Config(format!(
                        "unsupported scoring_func `{other}`; expected sigmoid, sqrtsoftplus or softmax"
                    )))
                }
            })
        };
        let mut spec = match family {
            Family::DeepseekV3 | Family::DeepseekV4 => {
                let v4 = family == Family::DeepseekV4;
                let n_routed = need_usize(&v, "n_routed_experts")?;
                let num_hash = get_usize(&v, "num_hash_layers")?.unwrap_or(0);
                let mut hash_layers: Vec<usize> = (0..num_hash).collect();
                if let Some(types) = v.get("mlp_layer_types").and_then(Value::as_array) {
                    hash_layers = types
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| t.as_str().is_some_and(|s| s.contains("hash")))
                        .map(|(i, _)| i)
                        .collect();
                }
                let moe_ffn = need_usize(&v, "moe_intermediate_size")?;
                let n_shared = get_usize(&v, "n_shared_experts")?.unwrap_or(0);
                let fp8_block = match v.get("quantization_config") {
                    Some(q) if q.get("quant_method").and_then(Value::as_str) == Some("fp8") => {
                        let b = q.get("weight_block_size").and_then(Value::as_array);
                        let dims: Vec<usize> = b
                            .map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
                            .unwrap_or_else(|| vec![128, 128]);
                        if dims.len() != 2 || dims.contains(&0) {
                            return Err(CoreError::Config(
                                "quantization_config.weight_block_size must be two positive integers".into(),
                            ));
                        }
                        Some((dims[0], dims[1]))
                    }
                    _ => None,
                };
                ModelSpec {
                    model_type: model_type.clone(),
                    family,
                    hidden,
                    num_layers,
                    vocab_size,
                    moe_ffn,
                    n_routed,
                    n_shared,
                    shared_ffn: moe_ffn * n_shared,
                    shared_gate: false,
                    top_k: need_usize(&v, "num_experts_per_tok")?,
                    n_group: get_usize(&v, "n_group")?.unwrap_or(1).max(1),
                    topk_group: get_usize(&v, "topk_group")?.unwrap_or(1).max(1),
                    scoring: parse_scoring(if v4 { Scoring::SqrtSoftplus } else { Scoring::Sigmoid })?,
                    norm_topk_prob: get_bool(&v, "norm_topk_prob")?.unwrap_or(true),
                    routed_scaling: get_f64(&v, "routed_scaling_factor")?.unwrap_or(1.0),
                    first_dense: get_usize(&v, "first_k_dense_replace")?.unwrap_or(0),
                    moe_layer_freq: get_usize(&v, "moe_layer_freq")?.unwrap_or(1).max(1),
                    moe_layer_offset: 0,
                    dense_layers: vec![],
                    hash_layers,
                    swiglu_limit: get_f64(&v, "swiglu_limit")?.filter(|l| *l > 0.0),
                    fp8_block,
                }
            }
            Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe => {
                let mixtral = family == Family::Mixtral;
                // Qwen2-MoE's one shared expert has its own size; 0 (or absent) means none.
                let shared_ffn = if family == Family::Qwen2Moe {
                    get_usize(&v, "shared_expert_intermediate_size")?.unwrap_or(0)
                } else {
                    0
                };
                let n_routed =
                    if mixtral { need_usize(&v, "num_local_experts")? } else { need_usize(&v, "num_experts")? };
                let moe_ffn = if mixtral {
                    need_usize(&v, "intermediate_size")?
                } else {
                    need_usize(&v, "moe_intermediate_size")?
                };
                let dense_layers = v
                    .get("mlp_only_layers")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
                    .unwrap_or_default();
                ModelSpec {
                    model_type: model_type.clone(),
                    family,
                    hidden,
                    num_layers,
                    vocab_size,
                    moe_ffn,
                    n_routed,
                    n_shared: usize::from(shared_ffn > 0),
                    shared_ffn,
                    shared_gate: shared_ffn > 0,
                    top_k: need_usize(&v, "num_experts_per_tok")?,
                    n_group: 1,
                    topk_group: 1,
                    scoring: parse_scoring(Scoring::Softmax)?,
                    // Mixtral always renormalises the top-k; Qwen says so in its config (default no).
                    norm_topk_prob: if mixtral { true } else { get_bool(&v, "norm_topk_prob")?.unwrap_or(false) },
                    routed_scaling: 1.0,
                    first_dense: 0,
                    // transformers: layer L is sparse when (L + 1) % decoder_sparse_step == 0.
                    moe_layer_freq: get_usize(&v, "decoder_sparse_step")?.unwrap_or(1).max(1),
                    moe_layer_offset: 1,
                    dense_layers,
                    hash_layers: vec![],
                    swiglu_limit: None,
                    fp8_block: None,
                }
            }
        };
        spec.hash_layers.retain(|l| *l < spec.num_layers);
        spec.validate()?;
        Ok(spec)
    }

    /// Check the numbers are consistent; a config that fails here would fail later less clearly.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(CoreError::Config(m));
        if self.hidden == 0 || self.moe_ffn == 0 || self.n_routed == 0 || self.num_layers == 0 {
            return err("hidden_size, moe intermediate size, expert count and layer count must be positive".into());
        }
        if self.top_k == 0 || self.top_k > self.n_routed {
            return err(format!(
                "num_experts_per_tok is {}; expected 1..={} (the routed expert count)",
                self.top_k, self.n_routed
            ));
        }
        if !self.n_routed.is_multiple_of(self.n_group) {
            return err(format!("n_routed_experts {} is not divisible by n_group {}", self.n_routed, self.n_group));
        }
        if self.topk_group > self.n_group {
            return err(format!("topk_group {} exceeds n_group {}", self.topk_group, self.n_group));
        }
        let per_group = self.n_routed / self.n_group;
        if self.n_group > 1 && self.topk_group * per_group < self.top_k {
            return err(format!(
                "topk_group {} groups of {per_group} experts cannot supply {} experts per token",
                self.topk_group, self.top_k
            ));
        }
        if self.moe_layers().is_empty() {
            return err("the model has no MoE layer".into());
        }
        Ok(())
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer < self.num_layers
            && layer >= self.first_dense
            && (layer + self.moe_layer_offset).is_multiple_of(self.moe_layer_freq)
            && !self.dense_layers.contains(&layer)
    }

    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_layers).filter(|l| self.is_moe_layer(*l)).collect()
    }

    pub fn is_hash_layer(&self, layer: usize) -> bool {
        self.family == Family::DeepseekV4 && self.hash_layers.contains(&layer) && self.is_moe_layer(layer)
    }

    /// Whether the gate of `layer` has a score-correction bias tensor.
    pub fn has_gate_bias(&self, layer: usize) -> bool {
        matches!(self.family, Family::DeepseekV3 | Family::DeepseekV4) && !self.is_hash_layer(layer)
    }

    /// Explain why `layer` cannot be served as a MoE layer, if it cannot.
    pub fn check_moe_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.num_layers {
            return Err(CoreError::InvalidInput(format!(
                "layer {layer} is out of range: the model has {} layers (0 to {}); its MoE layers are {}",
                self.num_layers,
                self.num_layers.saturating_sub(1),
                describe_ranges(&self.moe_layers())
            )));
        }
        if !self.is_moe_layer(layer) {
            let moe = self.moe_layers();
            return Err(CoreError::InvalidInput(format!(
                "layer {layer} is a dense layer, not MoE; MoE layers are {}",
                describe_ranges(&moe)
            )));
        }
        Ok(())
    }

    /// Parameters in one routed expert.
    pub fn expert_params(&self) -> u64 {
        3 * self.hidden as u64 * self.moe_ffn as u64
    }

    fn prefix(&self, layer: usize) -> String {
        match self.family {
            Family::DeepseekV3 | Family::Qwen2Moe | Family::Qwen3Moe => format!("model.layers.{layer}.mlp."),
            Family::DeepseekV4 => format!("layers.{layer}.ffn."),
            Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe."),
        }
    }

    fn proj_name(&self, proj: Proj) -> &'static str {
        match (self.family, proj) {
            (Family::DeepseekV4 | Family::Mixtral, Proj::Gate) => "w1",
            (Family::DeepseekV4 | Family::Mixtral, Proj::Up) => "w3",
            (Family::DeepseekV4 | Family::Mixtral, Proj::Down) => "w2",
            (_, Proj::Gate) => "gate_proj",
            (_, Proj::Up) => "up_proj",
            (_, Proj::Down) => "down_proj",
        }
    }

    /// Router weight [n_routed, hidden].
    pub fn gate_weight_name(&self, layer: usize) -> String {
        format!("{}gate.weight", self.prefix(layer))
    }

    /// Score-correction bias [n_routed].
    pub fn gate_bias_name(&self, layer: usize) -> String {
        match self.family {
            Family::DeepseekV4 => format!("{}gate.bias", self.prefix(layer)),
            _ => format!("{}gate.e_score_correction_bias", self.prefix(layer)),
        }
    }

    /// Hash routing table [vocab, top_k] (V4 hash layers).
    pub fn tid2eid_name(&self, layer: usize) -> String {
        format!("{}gate.tid2eid", self.prefix(layer))
    }

    pub fn expert_weight_name(&self, layer: usize, expert: usize, proj: Proj) -> String {
        format!("{}experts.{expert}.{}.weight", self.prefix(layer), self.proj_name(proj))
    }

    pub fn shared_weight_name(&self, layer: usize, proj: Proj) -> String {
        let module = if self.family == Family::Qwen2Moe { "shared_expert" } else { "shared_experts" };
        format!("{}{module}.{}.weight", self.prefix(layer), self.proj_name(proj))
    }

    /// The shared expert's gate [1, hidden] (when `shared_gate`).
    pub fn shared_gate_name(&self, layer: usize) -> String {
        format!("{}shared_expert_gate.weight", self.prefix(layer))
    }

    /// Expected [rows, cols] of a projection of an FFN with intermediate size `ffn`.
    pub fn proj_shape(&self, proj: Proj, ffn: usize) -> [usize; 2] {
        match proj {
            Proj::Gate | Proj::Up => [ffn, self.hidden],
            Proj::Down => [self.hidden, ffn],
        }
    }
}

/// "0..=2, 5, 7..=9" for a sorted list.
pub fn describe_ranges(xs: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let mut j = i;
        while j + 1 < xs.len() && xs[j + 1] == xs[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { format!("{}", xs[i]) } else { format!("{}..={}", xs[i], xs[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

/// Shape overrides for presets (`gen-model --layers --experts --hidden --ffn ...`).
#[derive(Debug, Clone, Default)]
pub struct PresetOverrides {
    pub layers: Option<usize>,
    pub experts: Option<usize>,
    pub hidden: Option<usize>,
    pub ffn: Option<usize>,
    pub top_k: Option<usize>,
    pub vocab: Option<usize>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub fp8: Option<bool>,
}

/// Names of the built-in presets.
pub const PRESETS: &[&str] = &[
    "tiny",
    "tiny-v3",
    "tiny-v4",
    "tiny-mixtral",
    "tiny-qwen2",
    "tiny-qwen3",
    "deepseek-v3",
    "deepseek-v4-flash",
    "deepseek-v4-pro",
    "mixtral-8x7b",
    "qwen1.5-moe-a2.7b",
    "qwen2-57b-a14b",
    "qwen3-30b-a3b",
];

/// The upstream `config.json` of a preset, with overrides applied.
pub fn preset_config(name: &str, o: &PresetOverrides) -> Result<Value> {
    let v3 = |hidden: usize,
              layers: usize,
              dense: usize,
              ffn: usize,
              experts: usize,
              k: usize,
              g: usize,
              tg: usize,
              vocab: usize| {
        json!({
            "model_type": "deepseek_v3",
            "architectures": ["DeepseekV3ForCausalLM"],
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "first_k_dense_replace": dense,
            "intermediate_size": ffn * 9,
            "moe_intermediate_size": ffn,
            "n_routed_experts": experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": k,
            "n_group": g,
            "topk_group": tg,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": true,
            "routed_scaling_factor": 2.5,
            "moe_layer_freq": 1,
            "vocab_size": vocab,
            "torch_dtype": "bfloat16",
        })
    };
    let v4 = |hidden: usize, layers: usize, ffn: usize, experts: usize, k: usize, scale: f64, vocab: usize| {
        json!({
            "model_type": "deepseek_v4",
            "architectures": ["DeepseekV4ForCausalLM"],
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "first_k_dense_replace": 0,
            "moe_intermediate_size": ffn,
            "n_routed_experts": experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": k,
            "scoring_func": "sqrtsoftplus",
            "norm_topk_prob": true,
            "routed_scaling_factor": scale,
            "num_hash_layers": 3,
            "swiglu_limit": 10.0,
            "vocab_size": vocab,
            "torch_dtype": "bfloat16",
        })
    };
    let mut cfg = match name {
        "tiny" | "tiny-v3" => v3(64, 4, 1, 32, 16, 4, 4, 2, 1000),
        "tiny-v4" => v4(64, 5, 32, 16, 4, 1.5, 1000),
        "tiny-mixtral" => json!({
            "model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 48,
            "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1000,
        }),
        "tiny-qwen2" => json!({
            "model_type": "qwen2_moe", "hidden_size": 64, "num_hidden_layers": 3, "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 40, "num_experts": 16, "num_experts_per_tok": 4,
            "norm_topk_prob": false, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 1000,
        }),
        "tiny-qwen3" => json!({
            "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 3, "moe_intermediate_size": 24,
            "num_experts": 16, "num_experts_per_tok": 8, "norm_topk_prob": true, "decoder_sparse_step": 1,
            "mlp_only_layers": [1], "vocab_size": 1000,
        }),
        "deepseek-v3" => v3(7168, 61, 3, 2048, 256, 8, 8, 4, 129280),
        "deepseek-v4-flash" => v4(4096, 43, 2048, 256, 6, 1.5, 129280),
        "deepseek-v4-pro" => v4(7168, 61, 3072, 384, 6, 2.5, 129280),
        "mixtral-8x7b" => json!({
            "model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
            "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        }),
        "qwen1.5-moe-a2.7b" => json!({
            "model_type": "qwen2_moe", "hidden_size": 2048, "num_hidden_layers": 24, "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
            "norm_topk_prob": false, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        }),
        "qwen2-57b-a14b" => json!({
            "model_type": "qwen2_moe", "hidden_size": 3584, "num_hidden_layers": 28, "moe_intermediate_size": 2560,
            "shared_expert_intermediate_size": 20480, "num_experts": 64, "num_experts_per_tok": 8,
            "norm_topk_prob": false, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        }),
        "qwen3-30b-a3b" => json!({
            "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "moe_intermediate_size": 768,
            "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "vocab_size": 151936,
        }),
        other => {
            return Err(CoreError::Config(format!("unknown preset `{other}`; expected one of {}", PRESETS.join(", "))))
        }
    };
    let obj = cfg.as_object_mut().expect("preset is an object");
    for (k, v) in attention_fields(name) {
        obj.insert(k.to_string(), v);
    }
    let family = obj["model_type"].as_str().unwrap_or_default().to_string();
    let set = |obj: &mut serde_json::Map<String, Value>, key: &str, val: Option<usize>| {
        if let Some(x) = val {
            obj.insert(key.to_string(), json!(x));
        }
    };
    set(obj, "num_hidden_layers", o.layers);
    set(obj, "hidden_size", o.hidden);
    set(obj, "num_experts_per_tok", o.top_k);
    set(obj, "vocab_size", o.vocab);
    match family.as_str() {
        "mixtral" => {
            set(obj, "num_local_experts", o.experts);
            set(obj, "intermediate_size", o.ffn);
        }
        "qwen2_moe" | "qwen3_moe" => {
            set(obj, "num_experts", o.experts);
            set(obj, "moe_intermediate_size", o.ffn);
        }
        _ => {
            set(obj, "n_routed_experts", o.experts);
            set(obj, "moe_intermediate_size", o.ffn);
            set(obj, "n_group", o.n_group);
            set(obj, "topk_group", o.topk_group);
            if let (Some(layers), Some(d)) = (o.layers, obj.get("first_k_dense_replace").and_then(Value::as_u64)) {
                // Keep at least one MoE layer when scaling the layer count down.
                obj.insert("first_k_dense_replace".into(), json!((d as usize).min(layers.saturating_sub(1))));
            }
            if let (Some(layers), Some(h)) = (o.layers, obj.get("num_hash_layers").and_then(Value::as_u64)) {
                obj.insert("num_hash_layers".into(), json!((h as usize).min(layers.saturating_sub(1))));
            }
            if (o.experts.is_some() || o.top_k.is_some()) && o.n_group.is_none() && family == "deepseek_v3" {
                // Keep the group limit valid when the expert count or top-k changes.
                let get = |k: &str| obj.get(k).and_then(Value::as_u64).unwrap_or(1) as usize;
                let (e, g, tg, k) =
                    (get("n_routed_experts"), get("n_group"), get("topk_group"), get("num_experts_per_tok"));
                if e % g != 0 || tg * (e / g) < k {
                    obj.insert("n_group".into(), json!(1));
                    obj.insert("topk_group".into(), json!(1));
                }
            }
        }
    }
    if o.fp8 == Some(true) {
        if family != "deepseek_v3" {
            return Err(CoreError::Config(
                "--fp8 applies to deepseek_v3 presets (the official FP8 block-scale format)".into(),
            ));
        }
        obj.insert(
            "quantization_config".into(),
            json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}),
        );
    }
    ModelSpec::from_config_json(&cfg.to_string())?;
    Ok(cfg)
}

/// The attention and whole-model fields of a preset's upstream config.json (the planner reads
/// them; MoE serving does not). Values from the published config.json files (see
/// ../shared/REFERENCE.md and docs/planner.md).
fn attention_fields(name: &str) -> Vec<(&'static str, Value)> {
    let mla = |heads: usize, q: usize, kv: usize, nope: usize, rope: usize, v: usize, ctx: usize| {
        vec![
            ("num_attention_heads", json!(heads)),
            ("num_key_value_heads", json!(heads)),
            ("q_lora_rank", json!(q)),
            ("kv_lora_rank", json!(kv)),
            ("qk_nope_head_dim", json!(nope)),
            ("qk_rope_head_dim", json!(rope)),
            ("v_head_dim", json!(v)),
            ("max_position_embeddings", json!(ctx)),
            ("num_nextn_predict_layers", json!(1)),
            ("tie_word_embeddings", json!(false)),
        ]
    };
    // V4: [window-only or HCA] x2, then CSA (ratio 4) and HCA (ratio 128) alternating.
    let v4 = |layers: usize, first: usize, heads: usize, q: usize, groups: usize, topk: usize, tiny: bool| {
        let ratios: Vec<usize> = (0..layers)
            .map(|l| {
                if l < 2 {
                    first
                } else if (l - 2) % 2 == 0 {
                    4
                } else {
                    128
                }
            })
            .collect();
        let (hd, rope, o_rank, ih, ihd, window) =
            if tiny { (16, 8, 16, 4, 8, 8) } else { (512, 64, 1024, 64, 128, 128) };
        vec![
            ("num_attention_heads", json!(heads)),
            ("num_key_value_heads", json!(1)),
            ("head_dim", json!(hd)),
            ("qk_rope_head_dim", json!(rope)),
            ("q_lora_rank", json!(q)),
            ("o_lora_rank", json!(o_rank)),
            ("o_groups", json!(groups)),
            ("index_n_heads", json!(ih)),
            ("index_head_dim", json!(ihd)),
            ("index_topk", json!(topk)),
            ("sliding_window", json!(window)),
            ("compress_ratios", json!(ratios)),
            ("hc_mult", json!(4)),
            ("max_position_embeddings", json!(1_048_576)),
            ("num_nextn_predict_layers", json!(1)),
            ("tie_word_embeddings", json!(false)),
        ]
    };
    let gqa = |heads: usize, kv: usize, hd: usize, ctx: usize| {
        vec![
            ("num_attention_heads", json!(heads)),
            ("num_key_value_heads", json!(kv)),
            ("head_dim", json!(hd)),
            ("max_position_embeddings", json!(ctx)),
            ("tie_word_embeddings", json!(false)),
        ]
    };
    match name {
        "tiny" | "tiny-v3" => mla(4, 32, 16, 16, 8, 16, 4096),
        "tiny-v4" => v4(5, 0, 4, 32, 2, 16, true),
        "tiny-mixtral" | "tiny-qwen2" | "tiny-qwen3" => gqa(4, 2, 16, 4096),
        "deepseek-v3" => mla(128, 1536, 512, 128, 64, 128, 163_840),
        "deepseek-v4-flash" => v4(43, 0, 64, 1024, 8, 512, false),
        "deepseek-v4-pro" => v4(61, 128, 128, 1536, 16, 1024, false),
        "mixtral-8x7b" => gqa(32, 8, 128, 32_768),
        "qwen1.5-moe-a2.7b" => gqa(16, 16, 128, 8192),
        "qwen2-57b-a14b" => gqa(28, 4, 128, 32_768),
        "qwen3-30b-a3b" => gqa(32, 4, 128, 40_960),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_preset_matches_reference_facts() {
        let cfg = preset_config("deepseek-v3", &PresetOverrides::default()).unwrap();
        let s = ModelSpec::from_config_json(&cfg.to_string()).unwrap();
        assert_eq!(s.moe_layers().len(), 58);
        assert_eq!((s.n_group, s.topk_group, s.top_k), (8, 4, 8));
        assert_eq!(s.scoring, Scoring::Sigmoid);
        assert!(!s.is_moe_layer(2) && s.is_moe_layer(3));
        assert_eq!(s.gate_bias_name(3), "model.layers.3.mlp.gate.e_score_correction_bias");
        assert_eq!(s.expert_weight_name(3, 7, Proj::Down), "model.layers.3.mlp.experts.7.down_proj.weight");
    }

    /// Qwen2-MoE as transformers reads it: one shared expert of `shared_expert_intermediate_size`
    /// under `mlp.shared_expert`, gated by `mlp.shared_expert_gate`; no renormalisation unless
    /// the config asks; `shared_expert_intermediate_size` 0 means no shared expert.
    #[test]
    fn qwen2_moe_config() {
        let cfg = preset_config("qwen2-57b-a14b", &PresetOverrides::default()).unwrap();
        let s = ModelSpec::from_config_json(&cfg.to_string()).unwrap();
        assert_eq!((s.family, s.n_routed, s.top_k, s.moe_ffn), (Family::Qwen2Moe, 64, 8, 2560));
        assert_eq!((s.n_shared, s.shared_ffn, s.shared_gate, s.norm_topk_prob), (1, 20480, true, false));
        assert_eq!(s.scoring, Scoring::Softmax);
        assert_eq!(s.shared_weight_name(5, Proj::Up), "model.layers.5.mlp.shared_expert.up_proj.weight");
        assert_eq!(s.shared_gate_name(5), "model.layers.5.mlp.shared_expert_gate.weight");
        assert_eq!(s.expert_weight_name(5, 63, Proj::Gate), "model.layers.5.mlp.experts.63.gate_proj.weight");
        assert_eq!(s.moe_layers().len(), 28);
        let mut none = cfg.clone();
        none["shared_expert_intermediate_size"] = json!(0);
        none["norm_topk_prob"] = json!(true);
        let s = ModelSpec::from_config_json(&none.to_string()).unwrap();
        assert_eq!((s.n_shared, s.shared_ffn, s.shared_gate, s.norm_topk_prob), (0, 0, false, true));
        // DeepSeek's shared experts stay fused at moe_ffn x n_shared, ungated.
        let v3 = ModelSpec::from_config_json(
            &preset_config("deepseek-v3", &PresetOverrides::default()).unwrap().to_string(),
        )
        .unwrap();
        assert_eq!((v3.shared_ffn, v3.shared_gate), (2048, false));
        assert_eq!(v3.shared_weight_name(3, Proj::Up), "model.layers.3.mlp.shared_experts.up_proj.weight");
    }

    /// transformers' rules: Qwen2/3-MoE layer L is sparse when (L + 1) % decoder_sparse_step
    /// == 0 and L is not in mlp_only_layers; DeepSeek layer L when L >= first_k_dense_replace
    /// and L % moe_layer_freq == 0.
    #[test]
    fn sparse_layer_rules_match_transformers() {
        let qwen = json!({
            "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 8, "moe_intermediate_size": 24,
            "num_experts": 16, "num_experts_per_tok": 4, "decoder_sparse_step": 2, "mlp_only_layers": [5],
            "vocab_size": 100,
        });
        let s = ModelSpec::from_config_json(&qwen.to_string()).unwrap();
        let want: Vec<usize> = (0..8).filter(|l| (l + 1) % 2 == 0 && *l != 5).collect();
        assert_eq!(s.moe_layers(), want);
        assert_eq!(want, vec![1, 3, 7]);
        let mut v3 = preset_config("tiny-v3", &PresetOverrides::default()).unwrap();
        v3["num_hidden_layers"] = json!(8);
        v3["first_k_dense_replace"] = json!(1);
        v3["moe_layer_freq"] = json!(2);
        let s = ModelSpec::from_config_json(&v3.to_string()).unwrap();
        assert_eq!(s.moe_layers(), vec![2, 4, 6]);
    }

    #[test]
    fn v4_pro_preset() {
        let cfg = preset_config("deepseek-v4-pro", &PresetOverrides::default()).unwrap();
        let s = ModelSpec::from_config_json(&cfg.to_string()).unwrap();
        assert_eq!(s.moe_layers().len(), 61);
        assert_eq!(s.expert_params(), 3 * 7168 * 3072);
        assert!(s.is_hash_layer(2) && !s.is_hash_layer(3));
        assert!(!s.has_gate_bias(0) && s.has_gate_bias(3));
        assert_eq!(s.swiglu_limit, Some(10.0));
        assert_eq!(s.expert_weight_name(5, 1, Proj::Gate), "layers.5.ffn.experts.1.w1.weight");
        assert_eq!(s.tid2eid_name(0), "layers.0.ffn.gate.tid2eid");
    }

    #[test]
    fn dense_and_out_of_range_layers_are_named() {
        let cfg = preset_config("tiny-v3", &PresetOverrides::default()).unwrap();
        let s = ModelSpec::from_config_json(&cfg.to_string()).unwrap();
        let e = s.check_moe_layer(0).unwrap_err().to_string();
        assert!(e.contains("dense") && e.contains("1..=3"), "{e}");
        let e = s.check_moe_layer(9).unwrap_err().to_string();
        assert!(e.contains("out of range") && e.contains("4 layers (0 to 3)") && e.contains("1..=3"), "{e}");
    }

    #[test]
    fn bad_configs_are_explained() {
        let e = ModelSpec::from_config_json(r#"{"model_type":"llama"}"#).unwrap_err().to_string();
        assert!(e.contains("llama"), "{e}");
        let e = ModelSpec::from_config_json(r#"{"model_type":"mixtral","hidden_size":8}"#).unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers"), "{e}");
        let o = PresetOverrides { top_k: Some(40), ..Default::default() };
        assert!(preset_config("tiny", &o).is_err());
    }

    #[test]
    fn overrides_scale_presets() {
        let o = PresetOverrides {
            layers: Some(2),
            experts: Some(64),
            hidden: Some(2048),
            ffn: Some(1024),
            top_k: Some(6),
            ..Default::default()
        };
        let s = ModelSpec::from_config_json(&preset_config("deepseek-v3", &o).unwrap().to_string()).unwrap();
        assert_eq!((s.hidden, s.n_routed, s.moe_ffn, s.top_k, s.num_layers), (2048, 64, 1024, 6, 2));
        assert_eq!(s.moe_layers(), vec![1]);
    }
}
