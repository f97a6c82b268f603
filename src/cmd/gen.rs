//! `expertmesh gen-model` and `gen-input`: synthetic checkpoints and inputs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::Checkpoint;
use expertmesh_worker::synth::{write_safetensors, GenOptions, OwnedTensor};

use crate::env;
use crate::shared::random_batch;

#[derive(Debug, Args)]
pub(crate) struct GenModelArgs {
    /// tiny (default), tiny-v3, tiny-v4, tiny-mixtral, tiny-qwen2, tiny-qwen3, deepseek-v3,
    /// deepseek-v4-flash, deepseek-v4-pro, mixtral-8x7b, qwen1.5-moe-a2.7b, qwen2-57b-a14b,
    /// qwen3-30b-a3b.
    #[arg(long, default_value = "tiny")]
    pub(crate) preset: String,
    /// Directory to write the model into (created; an existing model is kept unless --force).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Layers (default: the preset's).
    #[arg(long)]
    pub(crate) layers: Option<usize>,
    /// Routed experts per MoE layer (default: the preset's).
    #[arg(long)]
    pub(crate) experts: Option<usize>,
    /// Hidden size (default: the preset's).
    #[arg(long)]
    pub(crate) hidden: Option<usize>,
    /// Expert FFN (intermediate) size (default: the preset's).
    #[arg(long)]
    pub(crate) ffn: Option<usize>,
    /// Experts per token (default: the preset's).
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    /// Vocabulary size, for hash-routed layers (default: the preset's).
    #[arg(long)]
    pub(crate) vocab: Option<usize>,
    /// Expert groups of group-limited routing, DeepSeek V3 (default: the preset's).
    #[arg(long)]
    pub(crate) n_group: Option<usize>,
    /// Groups each token may use (default: the preset's).
    #[arg(long)]
    pub(crate) topk_group: Option<usize>,
    /// Expert weight dtype: bf16, f16, f32, or f8_e4m3 (DeepSeek V3's block-scaled FP8).
    #[arg(long, default_value = "bf16")]
    pub(crate) dtype: String,
    /// Seed of the random weights (or inputs): the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Refuse to write more than this many GiB.
    #[arg(long, default_value_t = 16.0)]
    pub(crate) max_gib: f64,
    /// Replace a model already in --out (without it, an existing config.json is an error).
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct GenInputArgs {
    /// Checkpoint directory whose shape the inputs take.
    #[arg(long, env = env::MODEL)]
    pub(crate) model: PathBuf,
    /// Tokens of input.
    #[arg(long, default_value_t = 16, value_parser = crate::shared::count)]
    pub(crate) tokens: usize,
    /// File to write the inputs into (safetensors).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Seed of the random weights (or inputs): the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

pub(crate) fn gen_model(a: GenModelArgs) -> Result<()> {
    if a.out.join("config.json").exists() && !a.force {
        anyhow::bail!(
            "{} already holds a model (config.json); give --force to replace it, or another --out",
            a.out.display()
        );
    }
    let opts = GenOptions {
        preset: a.preset,
        overrides: PresetOverrides {
            layers: a.layers,
            experts: a.experts,
            hidden: a.hidden,
            ffn: a.ffn,
            top_k: a.top_k,
            vocab: a.vocab,
            n_group: a.n_group,
            topk_group: a.topk_group,
            fp8: None,
        },
        dtype: DType::parse(&a.dtype)?,
        seed: a.seed,
        max_bytes: (a.max_gib * (1u64 << 30) as f64) as u64,
    };
    // Progress: a bar on a terminal, a line every 5 s otherwise.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let start = std::time::Instant::now();
    let mut last = start;
    let mut report = |done: u64, total: u64| {
        let now = std::time::Instant::now();
        let every = if tty { std::time::Duration::from_millis(200) } else { std::time::Duration::from_secs(5) };
        if now.duration_since(last) < every {
            return;
        }
        last = now;
        let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-9);
        let text = expertmesh_core::metrics::progress_text(done, total, rate);
        if tty {
            eprint!("\r{} {text}\x1b[K", expertmesh_core::metrics::progress_bar(done, total, 30));
        } else {
            eprintln!("writing {}: {text}", a.out.display());
        }
    };
    let s = expertmesh_worker::synth::generate_with_progress(&a.out, &opts, &mut report)?;
    if tty {
        eprint!("\r\x1b[K");
    }
    println!(
        "wrote {} ({}): {} MoE layers x {} experts, hidden {}, expert FFN {}, top-{}; {} files, {:.1} MiB",
        a.out.display(),
        s.spec.model_type,
        s.spec.moe_layers().len(),
        s.spec.n_routed,
        s.spec.hidden,
        s.spec.moe_ffn,
        s.spec.top_k,
        s.files,
        s.bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}

pub(crate) fn gen_input(a: GenInputArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.model)?;
    let spec = ck.spec();
    let (x, ids) = random_batch(spec, a.tokens, a.seed);
    let mut t = BTreeMap::new();
    t.insert("hidden_states".to_string(), OwnedTensor::from_f32(DType::F32, vec![a.tokens, spec.hidden], &x)?);
    t.insert("input_ids".to_string(), OwnedTensor::from_i64(vec![a.tokens], &ids));
    write_safetensors(&a.out, &t)?;
    println!(
        "wrote {}: hidden_states f32 [{}, {}], input_ids i64 [{}]",
        a.out.display(),
        a.tokens,
        spec.hidden,
        a.tokens
    );
    Ok(())
}
