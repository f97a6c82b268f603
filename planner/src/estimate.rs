//! The estimate: memory per device, placement, dispatch/combine traffic, roofline step time and
//! tokens/s for one expert-parallel instance; the largest batch that fits and meets a latency
//! bound; the smallest inventory that meets a target; tokens/s against node count.
//! docs/planner.md writes out every equation here and how rough it is.

use std::collections::BTreeMap;

use expertmesh_core::placement::{CapacitySpread, PlacementPolicy, PlacementRequest, WorkerCapacity};
use serde::Serialize;

use crate::arch::ModelArch;
use crate::hardware::{DeviceSpec, Inventory, Pool};
use crate::{PlanError, Precision, Precisions, Result, GB};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Prefill,
    Decode,
}

/// What the cluster must serve.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub phase: Phase,
    /// Requests in flight per instance (decode) or prompts per step (prefill). None: the
    /// largest batch that fits in memory and meets `max_step_ms`.
    pub batch: Option<usize>,
    /// Decode: context each request attends to. Prefill: prompt length.
    pub context: usize,
    /// Prefill only: tokens per step (a chunk), instead of batch x context.
    pub tokens_per_step: Option<usize>,
    /// Cluster-wide tokens/s to reach (decode: generated tokens; prefill: prompt tokens).
    pub target_tokens_per_s: Option<f64>,
    /// Bound on one step (decode: time per output token), milliseconds.
    pub max_step_ms: Option<f64>,
}

/// How the devices of one instance split the work.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Layout {
    /// Devices in one expert-parallel instance (the experts are spread over them); None: all
    /// devices of the inventory form one instance.
    pub ep: Option<usize>,
    /// Tensor parallelism of attention (and dense layers); attention data parallelism is EP/TP.
    pub attn_tp: usize,
}

impl Default for Layout {
    fn default() -> Self {
        Layout { ep: None, attn_tp: 1 }
    }
}

/// Fractions of peak a real kernel reaches, and fixed costs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Efficiency {
    pub compute: f64,
    pub memory: f64,
    pub network: f64,
    /// Memory held back per device (runtime context, workspaces, fragmentation).
    pub reserve_frac: f64,
    /// Fixed cost of one dispatch or combine inside a node / between nodes, microseconds.
    pub intra_latency_us: f64,
    pub inter_latency_us: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        Efficiency {
            compute: 0.6,
            memory: 0.8,
            network: 0.8,
            reserve_frac: 0.06,
            intra_latency_us: 10.0,
            inter_latency_us: 25.0,
        }
    }
}

/// Everything a plan needs.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub arch: ModelArch,
    pub precisions: Precisions,
    pub inventory: Inventory,
    pub layout: Layout,
    pub workload: Workload,
    pub replicas: usize,
    pub eff: Efficiency,
    /// Measured tokens per (layer, expert), from a live cluster.
    pub expert_loads: Option<BTreeMap<(usize, usize), u64>>,
}

/// Bytes on one device, by what they hold.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Memory {
    pub experts: f64,
    pub attention_dense: f64,
    pub embeddings: f64,
    pub kv_cache: f64,
    pub activations: f64,
    pub comm_buffers: f64,
    pub reserve: f64,
    pub total: f64,
    pub capacity: f64,
}

impl Memory {
    pub fn parts(&self) -> [(&'static str, f64); 7] {
        [
            ("experts", self.experts),
            ("attention+dense", self.attention_dense),
            ("embeddings", self.embeddings),
            ("kv cache", self.kv_cache),
            ("activations", self.activations),
            ("comm buffers", self.comm_buffers),
            ("reserve", self.reserve),
        ]
    }
}

/// One device kind of the instance, at its most loaded device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub pool: String,
    pub device: String,
    pub count: usize,
    pub experts_held: u64,
    pub memory: Memory,
    pub fits: bool,
    /// Share of routed tokens the device computes.
    pub token_share: f64,
    pub compute_precision: Precision,
}

/// Traffic of one layer, at the busiest device.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct LayerComm {
    pub dispatch_intra_bytes: f64,
    pub dispatch_inter_bytes: f64,
    pub combine_intra_bytes: f64,
    pub combine_inter_bytes: f64,
    pub dispatch_s: f64,
    pub combine_s: f64,
}

/// Times of one layer, at the slowest device.
#[derive(Debug, Clone, Serialize)]
pub struct LayerTime {
    pub layer: usize,
    /// "dense", "moe", "moe-hash"; V4 adds the attention kind ("csa", "hca", "window").
    pub kind: String,
    pub attention_s: f64,
    pub experts_s: f64,
    pub comm: LayerComm,
    pub no_overlap_s: f64,
    pub overlap_s: f64,
}

/// Where a step's time goes (no overlap), seconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct StepBreakdown {
    pub attention_compute: f64,
    pub attention_memory: f64,
    pub experts_compute: f64,
    pub experts_memory: f64,
    pub dispatch: f64,
    pub combine: f64,
    pub head: f64,
}

impl StepBreakdown {
    pub fn parts(&self) -> [(&'static str, f64); 7] {
        [
            ("attention (compute-bound)", self.attention_compute),
            ("attention (memory-bound)", self.attention_memory),
            ("experts (compute-bound)", self.experts_compute),
            ("experts (memory-bound)", self.experts_memory),
            ("dispatch", self.dispatch),
            ("combine", self.combine),
            ("lm head", self.head),
        ]
    }
}

/// The placement, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementSummary {
    pub policy: String,
    pub layers: usize,
    pub experts_per_layer: usize,
    pub replicas: usize,
    pub min_held: u64,
    pub max_held: u64,
    /// Hottest device's token share over the mean share.
    pub load_imbalance: f64,
    pub from_measured_loads: bool,
    /// Whether the coordinator's placement code produced it (or, in search, the even spread it
    /// produces on a single-device-kind pool).
    pub exact: bool,
}

/// One evaluated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub model: String,
    pub precisions: Precisions,
    pub layout: Layout,
    pub instances: usize,
    pub devices_per_instance: usize,
    pub nodes_per_instance: usize,
    pub attn_dp: usize,
    pub batch: usize,
    pub tokens_per_step: usize,
    pub context: usize,
    pub phase: Phase,
    pub fits: bool,
    pub fit_problem: Option<String>,
    pub devices: Vec<DeviceReport>,
    pub placement: PlacementSummary,
    pub layers: Vec<LayerTime>,
    pub breakdown: StepBreakdown,
    pub step_no_overlap_s: f64,
    pub step_overlap_s: f64,
    /// Per instance, with overlap.
    pub tokens_per_s: f64,
    pub tokens_per_s_per_device: f64,
    pub tokens_per_s_per_node: f64,
    pub cluster_tokens_per_s: f64,
    /// What limits the step (largest part of the breakdown).
    pub bottleneck: String,
    /// Why the batch is not larger (auto batch only).
    pub batch_limit: Option<String>,
    pub target: Option<TargetCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target_tokens_per_s: Option<f64>,
    pub max_step_ms: Option<f64>,
    pub met: bool,
    pub instances_needed: Option<usize>,
    pub nodes_needed: Option<usize>,
}

#[derive(Debug)]
struct Dev {
    pool: usize,
    spec: DeviceSpec,
    intra_bw: f64,
    inter_bw: f64,
    group: usize,
}

/// One instance, batch-independent parts computed once.
#[derive(Debug)]
pub struct Instance<'a> {
    input: &'a PlanInput,
    devs: Vec<Dev>,
    pools: Vec<Pool>,
    instances: usize,
    nodes: usize,
    dp: usize,
    tp: usize,
    held: Vec<u64>,
    share: Vec<f64>,
    placement: PlacementSummary,
    placement_problem: Option<String>,
    params: crate::ParamCounts,
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b.max(1))
}

impl<'a> Instance<'a> {
    /// `exact`: run the coordinator's placement (else the even spread it gives a single kind).
    pub fn new(input: &'a PlanInput, exact: bool) -> Result<Self> {
        let total = input.inventory.devices();
        if total == 0 {
            return Err(PlanError::Inventory("the inventory has no devices".into()));
        }
        let ep = input.layout.ep.unwrap_or(total);
        let (pools, instances) = if ep == total {
            (input.inventory.pools.clone(), 1)
        } else {
            if input.inventory.pools.len() != 1 {
                return Err(PlanError::Layout(format!(
                    "--ep {ep} splits the inventory into instances, which needs a single pool; this inventory has {} (use all {total} devices as one instance)",
                    input.inventory.pools.len()
                )));
            }
            let p = &input.inventory.pools[0];
            if ep == 0
                || !total.is_multiple_of(ep)
                || (ep > p.devices_per_node && !ep.is_multiple_of(p.devices_per_node))
            {
                return Err(PlanError::Layout(format!(
                    "--ep {ep} must divide the {total} devices and be a whole number of {}-device nodes (or fit in one)",
                    p.devices_per_node
                )));
            }
            let mut one = p.clone();
            one.devices_per_node = p.devices_per_node.min(ep);
            one.nodes = ep / one.devices_per_node;
            (vec![one], total / ep)
        };
        let d: usize = pools.iter().map(Pool::devices).sum();
        let tp = input.layout.attn_tp.max(1);
        if !d.is_multiple_of(tp) || pools.iter().any(|p| p.devices_per_node % tp != 0 && tp > 1) {
            return Err(PlanError::Layout(format!(
                "attention TP {tp} must divide the devices of a node ({}) and of the instance ({d})",
                pools.iter().map(|p| p.devices_per_node.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut devs = Vec::with_capacity(d);
        for (pi, p) in pools.iter().enumerate() {
            for _ in 0..p.devices() {
                devs.push(Dev {
                    pool: pi,
                    spec: p.device.clone(),
                    intra_bw: p.intra_node_gbs * 1e9,
                    inter_bw: p.inter_node_gbps / 8.0 * 1e9,
                    group: p.scale_up_group(),
                });
            }
        }
        let nodes = pools.iter().map(|p| p.nodes).sum();
        let mut inst = Instance {
            input,
            devs,
            pools,
            instances,
            nodes,
            dp: d / tp,
            tp,
            held: vec![],
            share: vec![],
            placement: PlacementSummary {
                policy: String::new(),
                layers: 0,
                experts_per_layer: 0,
                replicas: 0,
                min_held: 0,
                max_held: 0,
                load_imbalance: 1.0,
                from_measured_loads: false,
                exact,
            },
            placement_problem: None,
            params: input.arch.params(),
        };
        inst.place(exact)?;
        Ok(inst)
    }

    fn arch(&self) -> &ModelArch {
        &self.input.arch
    }

    fn expert_bytes(&self) -> f64 {
        self.arch().spec.expert_params() as f64 * self.input.precisions.experts.bytes()
    }

    /// Memory a device has for experts once everything else (at batch 1 per rank) is placed.
    fn expert_room(&self, i: usize) -> f64 {
        let m = self.memory(i, 1, 1, 0);
        (m.capacity - m.total).max(0.0)
    }

    fn place(&mut self, exact: bool) -> Result<()> {
        let input = self.input;
        let s = &input.arch.spec;
        let layers = s.moe_layers();
        let r = self.input.replicas.max(1);
        let d = self.devs.len();
        if r > d {
            return Err(PlanError::Layout(format!(
                "{r} replicas of every expert need {r} devices; the instance has {d}"
            )));
        }
        let slots = (layers.len() * s.n_routed * r) as u64;
        let weight: Vec<f64> = self.devs.iter().map(|x| x.spec.peak_flops(self.input.precisions.experts)).collect();
        self.placement.layers = layers.len();
        self.placement.experts_per_layer = s.n_routed;
        self.placement.replicas = r;
        let eb = self.expert_bytes();
        let room: Vec<f64> = (0..d).map(|i| self.expert_room(i)).collect();
        if exact {
            let req = PlacementRequest {
                layers: layers.clone(),
                experts: s.n_routed,
                expert_bytes: eb.ceil() as u64,
                replicas: r,
            };
            let workers = |unbounded: bool| -> Vec<WorkerCapacity> {
                self.devs
                    .iter()
                    .enumerate()
                    .map(|(i, x)| WorkerCapacity {
                        id: format!("{}-{i}", self.pools[x.pool].name),
                        node: format!("{}-n{}", self.pools[x.pool].name, i / self.pools[x.pool].devices_per_node),
                        memory_bytes: if unbounded { u64::MAX / (4 * d as u64) } else { room[i] as u64 },
                        tflops: weight[i] / 1e12,
                    })
                    .collect()
            };
            let plan = match CapacitySpread.place(&req, &workers(false)) {
                Ok(p) => p,
                Err(e) => {
                    self.placement_problem = Some(e.to_string());
                    CapacitySpread.place(&req, &workers(true)).map_err(|e| PlanError::Placement(e.to_string()))?
                }
            };
            self.placement.policy = CapacitySpread.name().to_string();
            let mut held = vec![0u64; d];
            let mut load = vec![0f64; d];
            let loads = self.input.expert_loads.as_ref().filter(|m| m.values().any(|v| *v > 0));
            for (&l, experts) in &plan.layers {
                for (e, reps) in experts.iter().enumerate() {
                    let w = match loads {
                        Some(m) => m.get(&(l, e)).copied().unwrap_or(0) as f64,
                        None => 1.0,
                    };
                    for &wk in reps {
                        held[wk as usize] += 1;
                        load[wk as usize] += w / reps.len() as f64;
                    }
                }
            }
            let sum: f64 = load.iter().sum();
            self.share = load.iter().map(|x| if sum > 0.0 { x / sum } else { 1.0 / d as f64 }).collect();
            if let Some(p) = &self.placement_problem {
                // Name the device that overflows most, in the terms a planner reads.
                let (i, over) = (0..d)
                    .map(|i| (i, held[i] as f64 * eb - room[i]))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap_or((0, 0.0));
                let cap = self.devs[i].spec.memory_bytes();
                self.placement_problem = Some(format!(
                    "{p}: {} device {i} would hold {} experts ({:.1} GB) beside {:.1} GB of everything else; it has {:.1} GB ({:.1} GB short)",
                    self.devs[i].spec.name,
                    held[i],
                    held[i] as f64 * eb / GB,
                    (cap - room[i]) / GB,
                    cap / GB,
                    over / GB
                ));
            }
            self.held = held;
            self.placement.from_measured_loads = loads.is_some();
        } else {
            // CapacitySpread on one device kind: experts dealt evenly, the first devices one more.
            self.placement.policy = format!("{} (even spread)", CapacitySpread.name());
            self.held = (0..d as u64).map(|i| slots / d as u64 + u64::from(i < slots % d as u64)).collect();
            self.share = self.held.iter().map(|h| *h as f64 / slots as f64).collect();
            if let Some(i) = (0..d).find(|&i| self.held[i] as f64 * eb > room[i]) {
                self.placement_problem = Some(format!(
                    "device {i} needs {:.1} GB for {} experts; it has {:.1} GB left",
                    self.held[i] as f64 * eb / GB,
                    self.held[i],
                    room[i] / GB
                ));
            }
        }
        self.placement.min_held = self.held.iter().copied().min().unwrap_or(0);
        self.placement.max_held = self.held.iter().copied().max().unwrap_or(0);
        let mean = 1.0 / d as f64;
        self.placement.load_imbalance = self.share.iter().copied().fold(0.0, f64::max) / mean;
        Ok(())
    }

    fn tokens_per_step(&self, batch: usize) -> usize {
        let w = &self.input.workload;
        match w.phase {
            Phase::Decode => batch,
            Phase::Prefill => w.tokens_per_step.unwrap_or(batch * w.context),
        }
    }

    /// Memory of device `i` with `b_r` requests and `t_r` tokens on its attention rank and
    /// `routed` routed token-copies arriving per layer.
    fn memory(&self, i: usize, b_r: usize, t_r: usize, routed: usize) -> Memory {
        let a = self.arch();
        let p = &self.input.precisions;
        let dev = &self.devs[i];
        let params = self.params;
        let h = a.spec.hidden as f64;
        let tp = self.tp as f64;
        let kv_split = match a.attention {
            crate::Attention::Gqa { kv_heads, .. } => self.tp.min(kv_heads) as f64,
            _ => 1.0,
        };
        let held = self.held.get(i).copied().unwrap_or(0) as f64;
        let capacity = dev.spec.memory_bytes();
        let mut m = Memory {
            experts: held * self.expert_bytes(),
            attention_dense: (params.attention + params.dense_ffn + params.shared_experts + params.routers) as f64
                * p.attention.bytes()
                / tp,
            embeddings: params.embeddings as f64 * 2.0 / tp,
            kv_cache: b_r as f64 * a.kv_bytes_per_seq(self.input.workload.context, p.kv_cache) / kv_split,
            activations: t_r as f64 * h * 2.0 * (12 + 2 * a.hc_mult) as f64
                + routed as f64 * a.spec.moe_ffn as f64 * 2.0 * 2.0,
            comm_buffers: (2.0 * (routed.max(t_r * a.spec.top_k)) as f64 * h * 2.0).max(256.0 * 1024.0 * 1024.0),
            reserve: self.input.eff.reserve_frac * capacity,
            total: 0.0,
            capacity,
        };
        m.total =
            m.experts + m.attention_dense + m.embeddings + m.kv_cache + m.activations + m.comm_buffers + m.reserve;
        m
    }

    /// Evaluate at a batch (requests per instance, or prompts per step for prefill).
    pub fn at_batch(&self, batch: usize) -> Estimate {
        let input = self.input;
        let a = self.arch();
        let s = &a.spec;
        let p = input.precisions;
        let eff = input.eff;
        let w = &input.workload;
        let d = self.devs.len();
        let batch = batch.max(1);
        let t = self.tokens_per_step(batch);
        let t_r = ceil_div(t, self.dp);
        let b_r = ceil_div(batch, self.dp);
        let tp = self.tp as f64;
        let h = s.hidden as f64;
        let k = s.top_k as f64;
        let decode = w.phase == Phase::Decode;
        let ctx = if decode { w.context as f64 } else { w.context as f64 / 2.0 };
        let disp_bytes = if p.experts <= Precision::Fp8 { 1.0 + 4.0 / 128.0 } else { 2.0 };
        let e_slots = (s.n_routed * self.placement.replicas) as f64;
        let lambda = t as f64 * k / e_slots;
        let hit = 1.0 - (-lambda).exp();
        let n_moe = s.moe_layers().len().max(1) as f64;
        let params = self.params;

        // Per device, per layer: routed copies in and out.
        let recv: Vec<f64> = self.share.iter().map(|sh| t as f64 * k * sh).collect();
        let send = t as f64 / d as f64 * k;

        // Memory and fit.
        let mut devices: BTreeMap<usize, DeviceReport> = BTreeMap::new();
        let mut fit_problem = self.placement_problem.clone();
        for (i, r) in recv.iter().enumerate() {
            let m = self.memory(i, b_r, t_r, r.ceil() as usize);
            let fits = m.total <= m.capacity;
            if !fits && fit_problem.is_none() {
                fit_problem = Some(format!(
                    "{} device {i} needs {:.1} GB; it has {:.1} GB",
                    self.devs[i].spec.name,
                    m.total / GB,
                    m.capacity / GB
                ));
            }
            let pool = self.devs[i].pool;
            let better = devices.get(&pool).is_none_or(|r| m.total > r.memory.total);
            let count = devices.get(&pool).map_or(0, |r| r.count) + 1;
            if better {
                devices.insert(
                    pool,
                    DeviceReport {
                        pool: self.pools[pool].name.clone(),
                        device: self.devs[i].spec.name.clone(),
                        count,
                        experts_held: self.held[i],
                        memory: m,
                        fits,
                        token_share: self.share[i],
                        compute_precision: self.devs[i].spec.compute_precision(p.experts),
                    },
                );
            } else if let Some(r) = devices.get_mut(&pool) {
                r.count = count;
                r.fits &= fits;
            }
        }
        let fits = fit_problem.is_none();

        // Layers.
        let mut layers = Vec::with_capacity(s.num_layers);
        let mut br = StepBreakdown::default();
        for l in 0..s.num_layers {
            let moe = s.is_moe_layer(l);
            let (core_flops, kv_read) = a.attention_core(l, ctx, decode, p.kv_cache);
            let attn_w = a.attention_params(l) as f64;
            let ffn_w = if moe {
                (3 * s.hidden * s.shared_ffn + s.n_routed * s.hidden) as f64
            } else {
                3.0 * h * a.dense_ffn as f64
            };
            let mut per_dev = Vec::with_capacity(d);
            for (i, dev) in self.devs.iter().enumerate() {
                let lin_flops = 2.0 * (attn_w + ffn_w) * t_r as f64 / tp;
                let core = core_flops * t_r as f64 / tp;
                let kv_bytes = if decode {
                    kv_read * b_r as f64
                } else {
                    a.kv_bytes_per_token(p.kv_cache) / s.num_layers as f64 * t_r as f64
                };
                let bytes = (attn_w + ffn_w) * p.attention.bytes() / tp + kv_bytes;
                let t_c = lin_flops / (dev.spec.peak_flops(p.attention) * eff.compute)
                    + core / (dev.spec.peak_flops(Precision::Bf16) * eff.compute);
                let t_m = bytes / (dev.spec.memory_bw_tbs * 1e12 * eff.memory);
                let attn_t = t_c.max(t_m);
                let (mut exp_t, mut exp_mem_bound, mut comm) = (0.0, false, LayerComm::default());
                if moe {
                    let held_here = self.held[i] as f64 / n_moe;
                    let flops = 2.0 * s.expert_params() as f64 * recv[i];
                    let bytes = held_here * hit * self.expert_bytes();
                    let c = flops / (dev.spec.peak_flops(p.experts) * eff.compute);
                    let m = bytes / (dev.spec.memory_bw_tbs * 1e12 * eff.memory);
                    exp_t = c.max(m);
                    exp_mem_bound = m > c;
                    let copies = recv[i].max(send);
                    let g = dev.group.min(d) as f64;
                    let intra_frac = (g - 1.0) / d as f64;
                    let inter_frac = (d as f64 - g) / d as f64;
                    let time = |bytes_per_copy: f64| -> (f64, f64, f64) {
                        let intra = copies * intra_frac * h * bytes_per_copy;
                        let inter = copies * inter_frac * h * bytes_per_copy;
                        let ti = if intra > 0.0 {
                            intra / (dev.intra_bw * eff.network) + eff.intra_latency_us * 1e-6
                        } else {
                            0.0
                        };
                        let te = if inter > 0.0 {
                            inter / (dev.inter_bw * eff.network) + eff.inter_latency_us * 1e-6
                        } else {
                            0.0
                        };
                        (intra, inter, ti.max(te))
                    };
                    let (di, de, dt) = time(disp_bytes);
                    let (ci, ce, ct) = time(2.0);
                    comm = LayerComm {
                        dispatch_intra_bytes: di,
                        dispatch_inter_bytes: de,
                        combine_intra_bytes: ci,
                        combine_inter_bytes: ce,
                        dispatch_s: dt,
                        combine_s: ct,
                    };
                }
                per_dev.push(DevLayer { attn_t, exp_t, attn_mem: t_m > t_c, exp_mem: exp_mem_bound, comm });
            }
            let (slowest, no_overlap, overlap) = reduce_layer(&per_dev);
            let DevLayer { attn_t, exp_t, attn_mem, exp_mem, comm } = slowest;
            if attn_mem {
                br.attention_memory += attn_t;
            } else {
                br.attention_compute += attn_t;
            }
            if exp_mem {
                br.experts_memory += exp_t;
            } else {
                br.experts_compute += exp_t;
            }
            br.dispatch += comm.dispatch_s;
            br.combine += comm.combine_s;
            let kind = match (moe, s.is_hash_layer(l), a.ratio(l), &a.attention) {
                (false, ..) => "dense".to_string(),
                (true, hash, r, crate::Attention::V4 { .. }) => format!(
                    "{}{}",
                    if hash { "moe-hash" } else { "moe" },
                    match r {
                        0 => "/window",
                        4 => "/csa",
                        _ => "/hca",
                    }
                ),
                (true, true, ..) => "moe-hash".into(),
                (true, false, ..) => "moe".into(),
            };
            layers.push(LayerTime {
                layer: l,
                kind,
                attention_s: attn_t,
                experts_s: exp_t,
                comm,
                no_overlap_s: no_overlap,
                overlap_s: overlap,
            });
        }
        // Output head on the slowest device: logits for one token per request.
        let head_w = params.embeddings as f64 / if a.tie_embeddings { 1.0 } else { 2.0 };
        br.head = self
            .devs
            .iter()
            .map(|dev| {
                let c = 2.0 * head_w * b_r as f64 / tp / (dev.spec.peak_flops(Precision::Bf16) * eff.compute);
                let m = head_w * 2.0 / tp / (dev.spec.memory_bw_tbs * 1e12 * eff.memory);
                c.max(m)
            })
            .fold(0.0, f64::max);
        let step_no = layers.iter().map(|x| x.no_overlap_s).sum::<f64>() + br.head;
        let step_ov = layers.iter().map(|x| x.overlap_s).sum::<f64>() + br.head;
        let tps = t as f64 / step_ov;
        let bottleneck = br
            .parts()
            .iter()
            .copied()
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .map(|(n, v)| format!("{n}: {:.0}% of the step without overlap", 100.0 * v / step_no))
            .unwrap_or_default();
        let mut est = Estimate {
            model: a.name.clone(),
            precisions: p,
            layout: Layout { ep: Some(d), attn_tp: self.tp },
            instances: self.instances,
            devices_per_instance: d,
            nodes_per_instance: self.nodes,
            attn_dp: self.dp,
            batch,
            tokens_per_step: t,
            context: w.context,
            phase: w.phase,
            fits,
            fit_problem,
            devices: devices.into_values().collect(),
            placement: self.placement.clone(),
            layers,
            breakdown: br,
            step_no_overlap_s: step_no,
            step_overlap_s: step_ov,
            tokens_per_s: tps,
            tokens_per_s_per_device: tps / d as f64,
            tokens_per_s_per_node: tps / self.nodes as f64,
            cluster_tokens_per_s: tps * self.instances as f64,
            bottleneck,
            batch_limit: None,
            target: None,
        };
        est.target = self.check_target(&est);
        est
    }

    fn check_target(&self, e: &Estimate) -> Option<TargetCheck> {
        let w = &self.input.workload;
        if w.target_tokens_per_s.is_none() && w.max_step_ms.is_none() {
            return None;
        }
        let latency_ok = w.max_step_ms.is_none_or(|m| e.step_overlap_s * 1e3 <= m);
        let needed = w.target_tokens_per_s.map(|t| (t / e.tokens_per_s).ceil().max(1.0) as usize);
        Some(TargetCheck {
            target_tokens_per_s: w.target_tokens_per_s,
            max_step_ms: w.max_step_ms,
            met: e.fits && latency_ok && needed.is_none_or(|n| n <= self.instances),
            instances_needed: needed.filter(|_| e.fits && latency_ok),
            nodes_needed: needed.filter(|_| e.fits && latency_ok).map(|n| n * self.nodes),
        })
    }

    /// The workload's batch, or the largest that fits and meets the step bound; None when
    /// not even one request per attention rank fits.
    pub fn best(&self) -> Option<Estimate> {
        if let Some(b) = self.input.workload.batch {
            return Some(self.at_batch(b));
        }
        let bound = self.input.workload.max_step_ms;
        let ok = |e: &Estimate| e.fits && bound.is_none_or(|m| e.step_overlap_s * 1e3 <= m);
        let lowest = self.at_batch(self.dp);
        if !ok(&lowest) {
            return if lowest.fits { Some(lowest) } else { None };
        }
        let (mut lo, mut hi) = (self.dp, self.dp * 2);
        const MAX_BATCH: usize = 1 << 22;
        while hi < MAX_BATCH && ok(&self.at_batch(hi)) {
            lo = hi;
            hi *= 2;
        }
        while hi - lo > 1.max(lo / 200) {
            let mid = lo + (hi - lo) / 2;
            if ok(&self.at_batch(mid)) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let mut e = self.at_batch(lo);
        let next = self.at_batch(hi);
        e.batch_limit = Some(if lo >= MAX_BATCH / 2 {
            "the planner's batch cap".into()
        } else if !next.fits {
            format!("memory: {} more requests do not fit ({})", hi - lo, next.fit_problem.unwrap_or_default())
        } else {
            format!(
                "the step bound: batch {hi} takes {:.2} ms > {:.2} ms",
                next.step_overlap_s * 1e3,
                bound.unwrap_or(0.0)
            )
        });
        Some(e)
    }
}

/// One device's times for one layer.
#[derive(Debug, Clone, Copy, Default)]
struct DevLayer {
    attn_t: f64,
    exp_t: f64,
    attn_mem: bool,
    exp_mem: bool,
    comm: LayerComm,
}

impl DevLayer {
    fn compute(&self) -> f64 {
        self.attn_t + self.exp_t
    }
    fn link(&self) -> f64 {
        self.comm.dispatch_s + self.comm.combine_s
    }
}

/// A layer's time over its devices, which all wait for one another: without overlap, the
/// slowest device's compute plus its communication; with overlap, the slowest compute or the
/// slowest link, whichever is longer, even when they are on different devices.
fn reduce_layer(devs: &[DevLayer]) -> (DevLayer, f64, f64) {
    let slowest = devs.iter().copied().max_by(|a, b| (a.compute() + a.link()).total_cmp(&(b.compute() + b.link())));
    let slowest = slowest.unwrap_or_default();
    let compute = devs.iter().map(DevLayer::compute).fold(0.0, f64::max);
    let link = devs.iter().map(DevLayer::link).fold(0.0, f64::max);
    (slowest, slowest.compute() + slowest.link(), compute.max(link))
}

/// Evaluate the input as given: one instance over the inventory (or `--ep` devices), with the
/// coordinator's placement code.
/// A plan that does not fit comes back too, with `fits` false, the memory it would need at one
/// request per attention rank, and `fit_problem` naming the device that overflows.
pub fn evaluate(input: &PlanInput) -> Result<Estimate> {
    let inst = Instance::new(input, true)?;
    Ok(inst.best().unwrap_or_else(|| {
        let mut e = inst.at_batch(inst.dp);
        e.batch_limit = Some("memory: the model does not fit even at one request per attention rank".into());
        e
    }))
}

/// One point of the tokens/s-against-nodes curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub nodes: usize,
    /// Best cluster tokens/s with this many nodes: copies of the best instance that fits in
    /// them (nodes left over stay idle); 0 when nothing fits.
    pub tokens_per_s: f64,
    pub nodes_per_instance: usize,
    pub attn_tp: usize,
    pub batch: usize,
}

/// A candidate of the search.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub pool: String,
    pub nodes_per_instance: usize,
    pub attn_tp: usize,
    pub instances: usize,
    pub total_nodes: usize,
    pub batch: usize,
    pub instance_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    /// The smallest inventory that meets the target, evaluated exactly.
    pub best: Option<Estimate>,
    pub choice: Option<Candidate>,
    /// Best candidate per pool device kind.
    pub per_pool: Vec<Candidate>,
    /// Per pool device kind, tokens/s against node count.
    pub curves: BTreeMap<String, Vec<CurvePoint>>,
    /// What would limit the chosen configuration next.
    pub next_bottleneck: Option<String>,
    pub note: Option<String>,
}

fn tp_options(pool: &Pool, d: usize) -> Vec<usize> {
    [1usize, 2, 4, 8, 16]
        .into_iter()
        .filter(|t| *t <= pool.devices_per_node && pool.devices_per_node.is_multiple_of(*t) && d.is_multiple_of(*t))
        .collect()
}

/// Best instance of `n` nodes of `pool` (over attention TP), fast placement.
fn best_instance(base: &PlanInput, pool: &Pool, n: usize, tp_fixed: Option<usize>) -> Option<Estimate> {
    let mut p = pool.clone();
    p.nodes = n;
    let tps = tp_fixed.map(|t| vec![t]).unwrap_or_else(|| tp_options(&p, p.devices()));
    let mut best: Option<Estimate> = None;
    for tp in tps {
        let input = PlanInput {
            inventory: Inventory { pools: vec![p.clone()] },
            layout: Layout { ep: None, attn_tp: tp },
            ..base.clone()
        };
        let Ok(inst) = Instance::new(&input, false) else { continue };
        let Some(e) = inst.best() else { continue };
        let ok = e.fits && base.workload.max_step_ms.is_none_or(|m| e.step_overlap_s * 1e3 <= m);
        if ok && best.as_ref().is_none_or(|b| e.tokens_per_s > b.tokens_per_s) {
            best = Some(e);
        }
    }
    best
}

/// Tokens/s against node count for `pool`: for each N, the best of floor(N/n) copies of an
/// n-node instance, n <= N.
pub fn curve(base: &PlanInput, pool: &Pool, max_nodes: usize, tp: Option<usize>) -> Vec<CurvePoint> {
    let per_n: Vec<Option<Estimate>> = (1..=max_nodes).map(|n| best_instance(base, pool, n, tp)).collect();
    (1..=max_nodes)
        .map(|big_n| {
            let mut pt = CurvePoint { nodes: big_n, tokens_per_s: 0.0, nodes_per_instance: 0, attn_tp: 0, batch: 0 };
            for (i, e) in per_n.iter().enumerate().take(big_n) {
                let n = i + 1;
                if let Some(e) = e {
                    let v = (big_n / n) as f64 * e.tokens_per_s;
                    if v > pt.tokens_per_s {
                        pt = CurvePoint {
                            nodes: big_n,
                            tokens_per_s: v,
                            nodes_per_instance: n,
                            attn_tp: e.layout.attn_tp,
                            batch: e.batch,
                        };
                    }
                }
            }
            pt
        })
        .collect()
}

/// The smallest inventory (fewest nodes) of any one pool's device kind that meets the
/// workload's target (or, with no target, that fits), searching nodes per instance up to
/// `max_nodes` and attention TP.
pub fn search(base: &PlanInput, max_nodes: usize) -> Result<SearchResult> {
    if base.inventory.pools.is_empty() {
        return Err(PlanError::Inventory("search needs at least one device kind".into()));
    }
    let target = base.workload.target_tokens_per_s;
    let mut per_pool = Vec::new();
    let mut curves = BTreeMap::new();
    let mut choice: Option<(Candidate, Pool)> = None;
    for pool in &base.inventory.pools {
        let mut best: Option<Candidate> = None;
        for n in 1..=max_nodes {
            let Some(e) = best_instance(base, pool, n, None) else { continue };
            let instances = target.map_or(1, |t| (t / e.tokens_per_s).ceil().max(1.0) as usize);
            let c = Candidate {
                pool: pool.name.clone(),
                nodes_per_instance: n,
                attn_tp: e.layout.attn_tp,
                instances,
                total_nodes: instances * n,
                batch: e.batch,
                instance_tokens_per_s: e.tokens_per_s,
            };
            let better = best.as_ref().is_none_or(|b| {
                c.total_nodes < b.total_nodes
                    || (c.total_nodes == b.total_nodes
                        && c.instance_tokens_per_s * c.instances as f64 > b.instance_tokens_per_s * b.instances as f64)
            });
            if better {
                best = Some(c);
            }
            if target.is_none() {
                break; // the first n that fits is the smallest inventory
            }
        }
        curves.insert(pool.name.clone(), curve(base, pool, max_nodes.min(32), None));
        if let Some(c) = best {
            let devs = |c: &Candidate, p: &Pool| c.total_nodes * p.devices_per_node;
            if choice.as_ref().is_none_or(|(b, bp)| devs(&c, pool) < devs(b, bp)) {
                choice = Some((c.clone(), pool.clone()));
            }
            per_pool.push(c);
        }
    }
    let Some((c, pool)) = choice else {
        return Ok(SearchResult {
            best: None,
            choice: None,
            per_pool,
            curves,
            next_bottleneck: None,
            note: Some(format!(
                "no configuration of up to {max_nodes} nodes per instance fits{}",
                if base.workload.max_step_ms.is_some() { " and meets the step bound" } else { "" }
            )),
        });
    };
    let mut p = pool.clone();
    p.nodes = c.nodes_per_instance * c.instances;
    let input = PlanInput {
        inventory: Inventory { pools: vec![p] },
        layout: Layout { ep: Some(c.nodes_per_instance * pool.devices_per_node), attn_tp: c.attn_tp },
        workload: Workload { batch: Some(c.batch), ..base.workload.clone() },
        ..base.clone()
    };
    let best = evaluate(&input)?;
    let mut next = Vec::new();
    let auto = PlanInput { workload: Workload { batch: None, ..base.workload.clone() }, ..input.clone() };
    if let Some(limit) = Instance::new(&auto, false).ok().and_then(|i| i.best()).and_then(|e| e.batch_limit) {
        next.push(format!("batch limited by {limit}"));
    }
    next.push(format!("step: {}", best.bottleneck));
    Ok(SearchResult {
        best: Some(best),
        choice: Some(c),
        per_pool,
        curves,
        next_bottleneck: Some(next.join("; ")),
        note: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::Catalog;
    use crate::Precisions;

    fn input(model: &str, device: &str, nodes: usize, experts: Precision, tp: usize, w: Workload) -> PlanInput {
        let c = Catalog::builtin();
        PlanInput {
            arch: ModelArch::preset(model).unwrap(),
            precisions: Precisions { experts, attention: Precision::Fp8, kv_cache: Precision::Fp8 },
            inventory: Inventory { pools: vec![Pool::of(c.get(device).unwrap(), nodes)] },
            layout: Layout { ep: None, attn_tp: tp },
            workload: w,
            replicas: 1,
            eff: Efficiency::default(),
            expert_loads: None,
        }
    }

    fn decode(batch: Option<usize>, context: usize) -> Workload {
        Workload {
            phase: Phase::Decode,
            batch,
            context,
            tokens_per_step: None,
            target_tokens_per_s: None,
            max_step_ms: None,
        }
    }

    /// SGLang's deployment notes: V4-Pro fits 8x H200 with FP4 experts, not with FP8; with FP8
    /// it needs 16x H200. V4-Flash fits 4x H200. Attention TP 8 inside a node, as deployed.
    #[test]
    fn reference_fit_cases() {
        let w = decode(None, 8192);
        let fp4 = evaluate(&input("deepseek-v4-pro", "h200", 1, Precision::Fp4, 8, w.clone())).unwrap();
        assert!(fp4.fits && fp4.batch >= 1, "{}", crate::report::text(&fp4));
        let fp8 = evaluate(&input("deepseek-v4-pro", "h200", 1, Precision::Fp8, 8, w.clone())).unwrap();
        assert!(!fp8.fits && !fp8.devices[0].fits, "{}", crate::report::text(&fp8));
        let why = fp8.fit_problem.unwrap();
        assert!(why.contains("h200-sxm device") && why.contains("141.0 GB"), "{why}");
        let fp8_16 = evaluate(&input("deepseek-v4-pro", "h200", 2, Precision::Fp8, 8, w.clone())).unwrap();
        assert!(fp8_16.fits, "{}", crate::report::text(&fp8_16));
        let mut flash = input("deepseek-v4-flash", "h200", 1, Precision::Fp4, 4, w);
        flash.inventory.pools[0].devices_per_node = 4;
        assert!(evaluate(&flash).unwrap().fits);
    }

    /// Expert bytes per device, worked out here from the published shapes rather than by the
    /// planner: V3 on 8 H200 at FP8 holds 58 x 256 / 8 experts of 3 x 7168 x 2048 parameters,
    /// at 1 byte plus one f32 scale per 128x128 block.
    #[test]
    fn memory_and_traffic_match_hand_computation() {
        let e = evaluate(&input("deepseek-v3", "h200", 2, Precision::Fp8, 1, decode(Some(256), 4096))).unwrap();
        let d = &e.devices[0];
        assert_eq!(d.experts_held, 58 * 256 / 16);
        let expert = 3.0 * 7168.0 * 2048.0 * (1.0 + 4.0 / 16384.0);
        assert!((d.memory.experts - 928.0 * expert).abs() < 1.0, "{}", d.memory.experts);
        // KV: 256 requests over 16 ranks, 4096 tokens each, 61 layers x 576 values at 1 byte.
        assert_eq!(d.memory.kv_cache, 16.0 * 4096.0 * 61.0 * 576.0);
        // Dispatch of one MoE layer: each device sends 256/16 tokens x 8 copies; 7/16 of them
        // stay in the node, 8/16 leave it; FP8 activations with one f32 scale per 128 values.
        let l = &e.layers[3].comm;
        let per_copy = 7168.0 * (1.0 + 4.0 / 128.0);
        assert!((l.dispatch_intra_bytes - 16.0 * 8.0 * 7.0 / 16.0 * per_copy).abs() < 1.0);
        assert!((l.dispatch_inter_bytes - 16.0 * 8.0 * 8.0 / 16.0 * per_copy).abs() < 1.0);
        assert!((l.combine_inter_bytes - 16.0 * 8.0 * 8.0 / 16.0 * 7168.0 * 2.0).abs() < 1.0);
        assert_eq!(e.layers[0].kind, "dense");
        assert_eq!(e.layers[0].comm, LayerComm::default());
    }

    /// More nodes never lower the achievable tokens/s.
    #[test]
    fn more_nodes_never_lower_tokens_per_s() {
        let cases = [
            input("deepseek-v3", "h200", 1, Precision::Fp8, 1, decode(None, 4096)),
            input("deepseek-v4-pro", "910c", 1, Precision::Int8, 1, decode(None, 32768)),
            input(
                "deepseek-v3",
                "h100",
                1,
                Precision::Fp8,
                1,
                Workload { phase: Phase::Prefill, tokens_per_step: Some(8192), ..decode(Some(1), 4096) },
            ),
        ];
        for inp in cases {
            let pts = curve(&inp, &inp.inventory.pools[0], 10, None);
            assert!(pts.iter().any(|p| p.tokens_per_s > 0.0), "{} fits nowhere", inp.arch.name);
            for w in pts.windows(2) {
                assert!(
                    w[1].tokens_per_s >= w[0].tokens_per_s,
                    "{}: {} nodes give {} tokens/s, {} give {}",
                    inp.arch.name,
                    w[0].nodes,
                    w[0].tokens_per_s,
                    w[1].nodes,
                    w[1].tokens_per_s
                );
            }
            assert!(pts.last().unwrap().tokens_per_s > pts.iter().find(|p| p.tokens_per_s > 0.0).unwrap().tokens_per_s);
        }
    }

    /// A longer context never lowers the KV memory of a plan.
    #[test]
    fn longer_context_never_lowers_kv_memory() {
        for model in ["deepseek-v3", "deepseek-v4-pro", "deepseek-v4-flash", "qwen3-30b-a3b"] {
            let mut last = -1.0;
            for ctx in [1, 64, 128, 129, 512, 4096, 65_536, 262_144] {
                let e = Instance::new(&input(model, "b200", 4, Precision::Fp4, 1, decode(Some(64), ctx)), false)
                    .unwrap()
                    .at_batch(64);
                let kv = e.devices[0].memory.kv_cache;
                assert!(kv >= last, "{model}: context {ctx} holds {kv} bytes of KV, less than {last}");
                last = kv;
            }
        }
    }

    /// A faster link never lengthens a step; on a network-bound plan it shortens it.
    #[test]
    fn faster_links_never_lengthen_a_step() {
        for (model, dev, nodes, batch) in [("deepseek-v3", "h800", 4, 512), ("deepseek-v4-pro", "h200", 2, 64)] {
            let base = input(model, dev, nodes, Precision::Fp8, 1, decode(Some(batch), 4096));
            let step = |intra: f64, inter: f64| {
                let mut i = base.clone();
                i.inventory.pools[0].intra_node_gbs *= intra;
                i.inventory.pools[0].inter_node_gbps *= inter;
                let e = Instance::new(&i, false).unwrap().at_batch(batch);
                (e.step_overlap_s, e.step_no_overlap_s)
            };
            let s0 = step(1.0, 1.0);
            for (a, b) in [(2.0, 1.0), (1.0, 2.0), (4.0, 4.0), (1.0, 100.0)] {
                let s = step(a, b);
                assert!(s.0 <= s0.0 && s.1 <= s0.1, "{model}: links x{a}/x{b} gave {s:?}, base {s0:?}");
            }
            assert!(step(1.0, 4.0).1 < s0.1, "{model}: a 4x NIC changed nothing");
        }
    }

    /// The search's answer is the smallest: the tokens/s-against-nodes curve (a separate path
    /// over the same evaluations) reaches the target at exactly that node count.
    #[test]
    fn search_finds_the_smallest_inventory() {
        let w = Workload { target_tokens_per_s: Some(60_000.0), max_step_ms: Some(60.0), ..decode(None, 4096) };
        let inp = input("deepseek-v3", "h200", 1, Precision::Fp8, 1, w);
        let r = search(&inp, 12).unwrap();
        let c = r.choice.clone().expect("a choice");
        let best = r.best.as_ref().unwrap();
        assert!(best.fits && best.target.as_ref().unwrap().met, "{}", crate::report::text(best));
        assert!(best.cluster_tokens_per_s >= 60_000.0 * 0.99);
        let pts = curve(&inp, &inp.inventory.pools[0], c.total_nodes, None);
        assert!(pts[c.total_nodes - 1].tokens_per_s >= 60_000.0);
        if c.total_nodes > 1 {
            assert!(pts[c.total_nodes - 2].tokens_per_s < 60_000.0, "{:?}", pts[c.total_nodes - 2]);
        }
        assert!(r.next_bottleneck.unwrap().contains("step:"));
    }

    #[test]
    fn bad_layouts_are_explained() {
        let mut i = input("deepseek-v3", "h200", 2, Precision::Fp8, 3, decode(Some(8), 1024));
        let e = Instance::new(&i, false).unwrap_err().to_string();
        assert!(e.contains("attention TP 3"), "{e}");
        i.layout = Layout { ep: Some(12), attn_tp: 1 };
        let e = Instance::new(&i, false).unwrap_err().to_string();
        assert!(e.contains("--ep 12"), "{e}");
        i.layout = Layout { ep: Some(8), attn_tp: 1 };
        let e = evaluate(&i).unwrap();
        assert_eq!((e.instances, e.devices_per_instance), (2, 8));
        i.replicas = 40;
        let e = Instance::new(&i, false).unwrap_err().to_string();
        assert!(e.contains("40 replicas"), "{e}");
    }

    /// Devices of a layer wait for one another. The overlapped time is the slowest compute or
    /// the slowest link, even when those are on different devices.
    #[test]
    fn a_layer_waits_for_the_slowest_compute_and_the_slowest_link() {
        let dev = |compute: f64, link: f64| DevLayer {
            attn_t: compute / 2.0,
            exp_t: compute / 2.0,
            comm: LayerComm { dispatch_s: link / 2.0, combine_s: link / 2.0, ..Default::default() },
            ..Default::default()
        };
        // Fast compute on a slow link, beside slow compute (the slowest device) on a fast link.
        let (slowest, no_overlap, overlap) = reduce_layer(&[dev(0.1, 1.0), dev(0.9, 0.3), dev(0.2, 0.2)]);
        assert_eq!(slowest.compute(), 0.9);
        assert!((no_overlap - 1.2).abs() < 1e-12);
        assert!((overlap - 1.0).abs() < 1e-12, "{overlap}");
        let (_, no, ov) = reduce_layer(&[dev(0.4, 0.1)]);
        assert!((no - 0.5).abs() < 1e-12 && (ov - 0.4).abs() < 1e-12);
    }

    /// Measured loads move the token share onto the devices that hold the hot experts.
    #[test]
    fn measured_loads_shape_the_token_share() {
        let mut i = input("deepseek-v3", "h200", 1, Precision::Fp8, 1, decode(Some(64), 1024));
        let uniform = evaluate(&i).unwrap();
        assert!((uniform.placement.load_imbalance - 1.0).abs() < 1e-9);
        let mut loads = BTreeMap::new();
        for l in i.arch.spec.moe_layers() {
            for e in 0..256 {
                loads.insert((l, e), if e == 0 { 10_000 } else { 10 });
            }
        }
        i.expert_loads = Some(loads);
        let hot = evaluate(&i).unwrap();
        assert!(hot.placement.from_measured_loads && hot.placement.load_imbalance > 2.0, "{:?}", hot.placement);
        assert!(hot.step_no_overlap_s > uniform.step_no_overlap_s);
    }
}
