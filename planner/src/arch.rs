//! The whole model as the planner sees it: the MoE spec from core plus attention design, dense
//! FFN, embeddings and multi-token-prediction layers, read from the same upstream config.json.
//! Parameter counts, KV cache bytes and FLOPs per token come from here.

use expertmesh_core::config::{preset_config, PresetOverrides};
use expertmesh_core::{Family, ModelSpec};
use serde::Serialize;
use serde_json::Value;

use crate::{PlanError, Precision, Result};

/// Attention design; decides weights, KV cache and attention FLOPs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Attention {
    /// Multi-head latent attention (DeepSeek V2/V3): one latent of `kv_lora_rank` plus a shared
    /// RoPE key of `qk_rope` per token and layer.
    Mla { heads: usize, q_lora_rank: usize, kv_lora_rank: usize, qk_nope: usize, qk_rope: usize, v_head: usize },
    /// DeepSeek V4: one shared KV head of `head_dim` per entry, over a sliding window of
    /// uncompressed entries plus compressed entries: CSA layers (ratio 4, a lightning indexer
    /// picks `index_topk` of them) and HCA layers (ratio 128, all attended); ratio 0 is window only.
    V4 {
        heads: usize,
        head_dim: usize,
        rope_dim: usize,
        q_lora_rank: usize,
        o_lora_rank: usize,
        o_groups: usize,
        index_heads: usize,
        index_head_dim: usize,
        index_topk: usize,
        window: usize,
        ratios: Vec<usize>,
    },
    /// Grouped-query attention (Mixtral, Qwen2, Qwen3).
    Gqa { heads: usize, kv_heads: usize, head_dim: usize },
}

/// Parameter counts, split the way a memory plan needs them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct ParamCounts {
    /// Routed experts of every MoE layer.
    pub routed_experts: u64,
    /// Shared experts of every MoE layer.
    pub shared_experts: u64,
    /// Router weights and correction biases.
    pub routers: u64,
    /// Attention of every layer (projections, compressors, indexers, norms, hyper-connections).
    pub attention: u64,
    /// FFN of the dense layers.
    pub dense_ffn: u64,
    /// Input embedding, output head and final norm.
    pub embeddings: u64,
    /// Multi-token-prediction layers (not counted in `total`).
    pub mtp: u64,
    /// Everything but MTP.
    pub total: u64,
    /// What one token touches: everything but the routed experts, plus top-k of them per MoE
    /// layer (input embedding and output head included; MTP excluded).
    pub active: u64,
}

/// A model the planner can size.
#[derive(Debug, Clone, Serialize)]
pub struct ModelArch {
    pub name: String,
    #[serde(skip)]
    pub spec: ModelSpec,
    pub attention: Attention,
    /// Intermediate size of the dense layers' FFN.
    pub dense_ffn: usize,
    pub tie_embeddings: bool,
    pub mtp_layers: usize,
    /// V4 hyper-connection streams (1: a plain residual).
    pub hc_mult: usize,
    pub max_context: usize,
    /// Fields the config did not have and the planner assumed.
    pub assumed: Vec<String>,
}

fn field(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

impl ModelArch {
    /// A preset name (deepseek-v3, deepseek-v4-pro, ...) or the text of a config.json.
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = preset_config(name, &PresetOverrides::default()).map_err(|e| PlanError::Model(e.to_string()))?;
        Self::from_config(name, &cfg)
    }

    pub fn from_config_text(name: &str, text: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| PlanError::Model(format!("{name}: not valid JSON: {e}")))?;
        Self::from_config(name, &v)
    }

    pub fn from_config(name: &str, v: &Value) -> Result<Self> {
        let spec = ModelSpec::from_config_json(&v.to_string()).map_err(|e| PlanError::Model(format!("{name}: {e}")))?;
        let mut assumed = Vec::new();
        let mut get = |key: &str, default: usize| -> usize {
            field(v, key).unwrap_or_else(|| {
                assumed.push(format!("{key} = {default}"));
                default
            })
        };
        let h = spec.hidden;
        let heads = get("num_attention_heads", (h / 128).max(1));
        let attention = match spec.family {
            Family::DeepseekV3 => Attention::Mla {
                heads,
                q_lora_rank: field(v, "q_lora_rank").unwrap_or(0),
                kv_lora_rank: get("kv_lora_rank", 512),
                qk_nope: get("qk_nope_head_dim", 128),
                qk_rope: get("qk_rope_head_dim", 64),
                v_head: get("v_head_dim", 128),
            },
            Family::DeepseekV4 => {
                let ratios: Vec<usize> = match v.get("compress_ratios").and_then(Value::as_array) {
                    Some(a) => a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect(),
                    None => vec![],
                };
                // The list may run past the decoder layers (MTP entries): keep one per layer.
                if v.get("compress_ratios").is_none() {
                    get("compress_ratios (window only)", 0);
                }
                let ratios = (0..spec.num_layers).map(|l| ratios.get(l).copied().unwrap_or(0)).collect();
                Attention::V4 {
                    heads,
                    head_dim: get("head_dim", 512),
                    rope_dim: get("qk_rope_head_dim", 64),
                    q_lora_rank: get("q_lora_rank", 1536),
                    o_lora_rank: get("o_lora_rank", 1024),
                    o_groups: get("o_groups", 8).max(1),
                    index_heads: get("index_n_heads", 64),
                    index_head_dim: get("index_head_dim", 128),
                    index_topk: get("index_topk", 1024),
                    window: get("sliding_window", 128),
                    ratios,
                }
            }
            Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe => Attention::Gqa {
                heads,
                kv_heads: get("num_key_value_heads", heads),
                head_dim: field(v, "head_dim").unwrap_or(h / heads.max(1)),
            },
        };
        let dense_ffn = if spec.family == Family::DeepseekV3 {
            field(v, "intermediate_size").unwrap_or(spec.moe_ffn * 9)
        } else {
            field(v, "intermediate_size").unwrap_or(spec.moe_ffn)
        };
        let max_context = get("max_position_embeddings", 4096);
        Ok(ModelArch {
            name: name.to_string(),
            attention,
            dense_ffn,
            tie_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            mtp_layers: field(v, "num_nextn_predict_layers").unwrap_or(0),
            hc_mult: field(v, "hc_mult").unwrap_or(1).max(1),
            max_context,
            assumed,
            spec,
        })
    }

    /// CSA/HCA compression ratio of `layer` (0: none or not V4).
    pub fn ratio(&self, layer: usize) -> usize {
        match &self.attention {
            Attention::V4 { ratios, .. } => ratios.get(layer).copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// Attention parameters of one layer, norms and hyper-connection mixers included.
    pub fn attention_params(&self, layer: usize) -> u64 {
        let h = self.spec.hidden as u64;
        let norms = 2 * h;
        let hc = if self.hc_mult > 1 {
            let m = self.hc_mult as u64;
            let mix = (2 + m) * m;
            2 * (mix * m * h + mix + 3)
        } else {
            0
        };
        let attn = match &self.attention {
            Attention::Mla { heads, q_lora_rank, kv_lora_rank, qk_nope, qk_rope, v_head } => {
                let (nh, q, kv) = (*heads as u64, *q_lora_rank as u64, *kv_lora_rank as u64);
                let qk = (*qk_nope + *qk_rope) as u64;
                let q_params = if q > 0 { h * q + q + q * nh * qk } else { h * nh * qk };
                q_params
                    + h * (kv + *qk_rope as u64)
                    + kv
                    + kv * nh * (*qk_nope + *v_head) as u64
                    + nh * *v_head as u64 * h
            }
            Attention::V4 {
                heads, head_dim, q_lora_rank, o_lora_rank, o_groups, index_heads, index_head_dim, ..
            } => {
                let (nh, d, q, o, g) =
                    (*heads as u64, *head_dim as u64, *q_lora_rank as u64, *o_lora_rank as u64, *o_groups as u64);
                // wq_a, q_norm, wq_b, wkv, kv_norm, wo_a (grouped), wo_b, attention sinks.
                let mut p = h * q + q + q * nh * d + h * d + d + nh * d * o + g * o * h + nh;
                let r = self.ratio(layer) as u64;
                if r > 0 {
                    // Compressor: kv and gate projections (CSA overlaps two windows), position
                    // embedding over the window, norm.
                    let coff = if r == 4 { 2 } else { 1 };
                    p += 2 * h * coff * d + r * coff * d + d;
                }
                if r == 4 {
                    // Lightning indexer: query projection from the q latent, head weights, and its
                    // own compressor of index_head_dim.
                    let (ih, ihd) = (*index_heads as u64, *index_head_dim as u64);
                    p += q * ih * ihd + h * ih + 2 * h * 2 * ihd + r * 2 * ihd + ihd;
                }
                p
            }
            Attention::Gqa { heads, kv_heads, head_dim } => {
                let (nh, kvh, d) = (*heads as u64, *kv_heads as u64, *head_dim as u64);
                h * nh * d + 2 * h * kvh * d + nh * d * h
            }
        };
        attn + norms + hc
    }

    fn embedding_params(&self) -> u64 {
        let e = (self.spec.vocab_size * self.spec.hidden) as u64;
        (if self.tie_embeddings { e } else { 2 * e }) + self.spec.hidden as u64
    }

    /// Parameters of one MoE layer's pieces: (routed, shared, router).
    fn moe_layer_params(&self) -> (u64, u64, u64) {
        let s = &self.spec;
        let routed = s.n_routed as u64 * s.expert_params();
        let shared = 3 * (s.hidden * s.shared_ffn) as u64;
        let bias = if matches!(s.family, Family::DeepseekV3 | Family::DeepseekV4) { s.n_routed as u64 } else { 0 };
        (routed, shared, (s.n_routed * s.hidden) as u64 + bias)
    }

    pub fn params(&self) -> ParamCounts {
        let s = &self.spec;
        let mut c = ParamCounts::default();
        let (routed, shared, router) = self.moe_layer_params();
        let moe_layers = s.moe_layers().len() as u64;
        for l in 0..s.num_layers {
            c.attention += self.attention_params(l);
        }
        c.routed_experts = routed * moe_layers;
        c.shared_experts = shared * moe_layers;
        c.routers = router * moe_layers;
        c.dense_ffn = (s.num_layers as u64 - moe_layers) * 3 * (s.hidden * self.dense_ffn) as u64;
        c.embeddings = self.embedding_params();
        // An MTP module: one more decoder layer (MoE), its projection of [2h -> h], and (as the
        // DeepSeek-V3 checkpoint stores them) its own copies of the embedding and head.
        let last = s.num_layers - 1;
        c.mtp = self.mtp_layers as u64
            * (self.attention_params(last)
                + routed
                + shared
                + router
                + 2 * (s.hidden * s.hidden) as u64
                + self.embedding_params());
        c.total = c.routed_experts + c.shared_experts + c.routers + c.attention + c.dense_ffn + c.embeddings;
        c.active = c.total - c.routed_experts + moe_layers * s.top_k as u64 * s.expert_params();
        c
    }

    /// KV cache bytes one sequence of `context` tokens holds, all layers. For V4 this includes
    /// the sliding window and the compressors' pending state, which do not grow with context.
    pub fn kv_bytes_per_seq(&self, context: usize, p: Precision) -> f64 {
        let b = p.kv_bytes();
        let c = context as f64;
        match &self.attention {
            Attention::Mla { kv_lora_rank, qk_rope, .. } => {
                c * (*kv_lora_rank + *qk_rope) as f64 * b * self.spec.num_layers as f64
            }
            Attention::Gqa { kv_heads, head_dim, .. } => {
                c * 2.0 * (*kv_heads * *head_dim) as f64 * b * self.spec.num_layers as f64
            }
            Attention::V4 { head_dim, index_head_dim, window, .. } => {
                let (d, ihd) = (*head_dim as f64, *index_head_dim as f64);
                (0..self.spec.num_layers)
                    .map(|l| {
                        let r = self.ratio(l);
                        let mut bytes = c.min(*window as f64) * d * b;
                        if r > 0 {
                            let entries = (c / r as f64).ceil();
                            let coff = if r == 4 { 2.0 } else { 1.0 };
                            // Compressed entries, plus up to coff*r pending rows kept in f32.
                            bytes += entries * d * b + coff * r as f64 * d * 4.0;
                            if r == 4 {
                                bytes += entries * ihd * b + 2.0 * r as f64 * ihd * 4.0;
                            }
                        }
                        bytes
                    })
                    .sum()
            }
        }
    }

    /// KV bytes per token of context, the part that grows with context (bytes per sequence at
    /// 1M tokens over 1M for V4, exact for MLA and GQA).
    pub fn kv_bytes_per_token(&self, p: Precision) -> f64 {
        match self.attention {
            Attention::V4 { .. } => {
                let n = 1 << 20;
                (self.kv_bytes_per_seq(n, p) - self.kv_bytes_per_seq(0, p)) / n as f64
            }
            _ => self.kv_bytes_per_seq(1, p),
        }
    }

    /// Attention FLOPs (score and value products, indexer) for one query token of `layer` that
    /// attends to `context` earlier tokens, and the KV bytes it reads to do so.
    pub fn attention_core(&self, layer: usize, context: f64, decode: bool, kv: Precision) -> (f64, f64) {
        let b = kv.kv_bytes();
        match &self.attention {
            Attention::Mla { heads, kv_lora_rank, qk_nope, qk_rope, v_head, .. } => {
                let (nh, c, r) = (*heads as f64, *kv_lora_rank as f64, *qk_rope as f64);
                let flops = if decode {
                    // Absorbed MLA: scores over the latent plus rope key, values from the latent.
                    2.0 * nh * context * (c + r) + 2.0 * nh * context * c
                } else {
                    2.0 * nh * context * (*qk_nope as f64 + r) + 2.0 * nh * context * *v_head as f64
                };
                (flops, context * (c + r) * b)
            }
            Attention::Gqa { heads, kv_heads, head_dim } => {
                let (nh, kvh, d) = (*heads as f64, *kv_heads as f64, *head_dim as f64);
                (4.0 * nh * d * context, context * 2.0 * kvh * d * b)
            }
            Attention::V4 { heads, head_dim, index_heads, index_head_dim, index_topk, window, .. } => {
                let (nh, d) = (*heads as f64, *head_dim as f64);
                let r = self.ratio(layer);
                let compressed = if r > 0 { context / r as f64 } else { 0.0 };
                let attended =
                    context.min(*window as f64) + if r == 4 { compressed.min(*index_topk as f64) } else { compressed };
                let mut flops = 4.0 * nh * d * attended;
                let mut bytes = attended * d * b;
                if r == 4 {
                    let (ih, ihd) = (*index_heads as f64, *index_head_dim as f64);
                    flops += 2.0 * ih * ihd * compressed;
                    bytes += compressed * ihd * b;
                }
                (flops, bytes)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(x: f64, want: f64, tol: f64) -> bool {
        (x - want).abs() / want <= tol
    }

    /// DeepSeek-V3 tech report: 671B total, 37B activated (both without the 14B MTP module).
    #[test]
    fn deepseek_v3_parameter_counts_match_the_tech_report() {
        let m = ModelArch::preset("deepseek-v3").unwrap();
        let p = m.params();
        eprintln!("{p:?}");
        assert!(within(p.total as f64, 671e9, 0.01), "total {}", p.total);
        assert!(within(p.active as f64, 37e9, 0.03), "active {}", p.active);
        // The MTP module is about 14B (the report's 685B = 671B + 14B).
        assert!(within(p.mtp as f64, 14e9, 0.15), "mtp {}", p.mtp);
        assert!(m.assumed.is_empty(), "{:?}", m.assumed);
    }

    /// Model cards: V4-Pro 1.6T total / 49B active; V4-Flash 284B / 13B. Our attention and
    /// compressor shapes are reconstructed from the config, so the tolerance is wider (5%).
    #[test]
    fn deepseek_v4_parameter_counts_match_the_model_cards() {
        let pro = ModelArch::preset("deepseek-v4-pro").unwrap().params();
        assert!(within(pro.total as f64, 1.6e12, 0.05), "pro total {}", pro.total);
        assert!(within(pro.active as f64, 49e9, 0.05), "pro active {}", pro.active);
        let flash = ModelArch::preset("deepseek-v4-flash").unwrap().params();
        eprintln!("pro {pro:?}\nflash {flash:?}");
        assert!(within(flash.total as f64, 284e9, 0.05), "flash total {}", flash.total);
        assert!(within(flash.active as f64, 13e9, 0.08), "flash active {}", flash.active);
    }

    /// Model cards: Qwen1.5-MoE-A2.7B 14.3B total / 2.7B active; Qwen2-57B-A14B 57B / 14B. Both
    /// hold most of their active parameters in the gated shared expert.
    #[test]
    fn qwen2_moe_parameter_counts_match_the_model_cards() {
        for (name, total, active) in [("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9), ("qwen2-57b-a14b", 57.4e9, 14e9)] {
            let p = ModelArch::preset(name).unwrap().params();
            eprintln!("{name}: {p:?}");
            assert!(within(p.total as f64, total, 0.02), "{name} total {}", p.total);
            assert!(within(p.active as f64, active, 0.03), "{name} active {}", p.active);
            assert!(p.shared_experts > 0, "{name}: shared expert counted");
        }
    }

    /// "Insights into DeepSeek-V3" (ISCA'25) Table 1: MLA at BF16 holds 70,272 bytes per token.
    #[test]
    fn v3_mla_kv_bytes_per_token() {
        let m = ModelArch::preset("deepseek-v3").unwrap();
        assert_eq!(m.kv_bytes_per_token(Precision::Bf16), 70_272.0);
        assert_eq!(m.kv_bytes_per_seq(1000, Precision::Bf16), 70_272_000.0);
        assert_eq!(m.kv_bytes_per_token(Precision::Fp8), 35_136.0);
    }

    /// V4 model card: at 1M tokens V4-Pro keeps ~10% of V3.2's KV cache and V4-Flash ~7%. V3.2
    /// stores 656 bytes of MLA (FP8 latent + scales + BF16 rope) and 132 of indexer keys per
    /// token and layer, 61 layers. Ours at FP8 should land near those fractions.
    #[test]
    fn v4_kv_is_a_tenth_of_v32_at_a_million_tokens() {
        let v32 = 61.0 * (656.0 + 132.0);
        let n = 1 << 20;
        let pro = ModelArch::preset("deepseek-v4-pro").unwrap().kv_bytes_per_seq(n, Precision::Fp8) / n as f64;
        let flash = ModelArch::preset("deepseek-v4-flash").unwrap().kv_bytes_per_seq(n, Precision::Fp8) / n as f64;
        eprintln!("pro {pro:.0} B/token ({:.3}), flash {flash:.0} ({:.3})", pro / v32, flash / v32);
        assert!((0.08..0.13).contains(&(pro / v32)), "pro {pro} B/token = {:.3} of V3.2", pro / v32);
        assert!((0.05..0.09).contains(&(flash / v32)), "flash {flash} B/token = {:.3} of V3.2", flash / v32);
    }

    #[test]
    fn kv_grows_with_context() {
        for name in
            ["deepseek-v3", "deepseek-v4-pro", "deepseek-v4-flash", "mixtral-8x7b", "qwen2-57b-a14b", "qwen3-30b-a3b"]
        {
            let m = ModelArch::preset(name).unwrap();
            let mut last = -1.0;
            for c in [0, 1, 3, 4, 5, 127, 128, 129, 1000, 4096, 65_536, 1 << 20] {
                let kv = m.kv_bytes_per_seq(c, Precision::Bf16);
                assert!(kv >= last, "{name}: context {c} holds {kv} < {last}");
                last = kv;
            }
        }
    }

    #[test]
    fn v4_layer_kinds_follow_the_config() {
        let pro = ModelArch::preset("deepseek-v4-pro").unwrap();
        let kinds: Vec<usize> = (0..61).map(|l| pro.ratio(l)).collect();
        assert_eq!(kinds.iter().filter(|r| **r == 4).count(), 30);
        assert_eq!(kinds.iter().filter(|r| **r == 128).count(), 31);
        let flash = ModelArch::preset("deepseek-v4-flash").unwrap();
        assert_eq!((flash.ratio(0), flash.ratio(1), flash.ratio(2), flash.ratio(42)), (0, 0, 4, 4));
    }

    #[test]
    fn config_without_attention_fields_names_the_assumptions() {
        let m = ModelArch::from_config_text(
            "mini",
            r#"{"model_type":"mixtral","hidden_size":256,"num_hidden_layers":2,"intermediate_size":512,
                "num_local_experts":4,"num_experts_per_tok":2}"#,
        )
        .unwrap();
        assert!(m.assumed.iter().any(|a| a.starts_with("num_attention_heads")), "{:?}", m.assumed);
        let e = ModelArch::from_config_text("broken", "{").unwrap_err().to_string();
        assert!(e.contains("broken") && e.contains("JSON"), "{e}");
    }
}
