"""The configuration tree: typed dataclasses, one per concern, every field documented.

Names in `ModelConfig` follow DeepSeek's reference `ModelArgs` so the YAML reads like
`config_671B.json`; the training recipe defaults follow the technical report, section 4.
"""

from dataclasses import dataclass, field

from data_pipeline.config import DataConfig

RECOMPUTE_REGIONS = ("norm", "mla_up_proj", "swiglu")


@dataclass
class ModelConfig:
    vocab_size: int = 129280  # rows of the embedding and output head
    dim: int = 7168  # hidden size d
    inter_dim: int = 18432  # FFN hidden size of the dense layers
    moe_inter_dim: int = 2048  # FFN hidden size of each routed and shared expert
    n_layers: int = 61  # transformer blocks of the main model
    n_dense_layers: int = 3  # the first blocks use a dense FFN instead of MoE
    n_heads: int = 128  # attention heads
    # Multi-head Latent Attention (report section 2.1.1)
    q_lora_rank: int = 1536  # query compression rank d_c'; 0 projects queries directly
    kv_lora_rank: int = 512  # joint key-value compression rank d_c
    qk_nope_head_dim: int = 128  # per-head query/key dimension without RoPE
    qk_rope_head_dim: int = 64  # per-head decoupled RoPE dimension d_h^R
    v_head_dim: int = 128  # per-head value dimension
    # DeepSeekMoE (report section 2.1.2)
    n_routed_experts: int = 256  # fine-grained routed experts per MoE layer
    n_shared_experts: int = 1  # shared experts, fused into one FFN of n_shared * moe_inter_dim
    n_activated_experts: int = 8  # routed experts per token K_r
    n_expert_groups: int = 8  # expert groups for group-limited routing
    n_limited_groups: int = 4  # groups a token may route to
    n_expert_nodes: int = 8  # nodes the routed experts are laid out over (contiguous blocks)
    max_nodes_per_token: int = 4  # node-limited routing: a token reaches at most M nodes
    route_scale: float = 2.5  # routed_scaling_factor applied to the normalised weights
    balance_loss_alpha: float = 0.0001  # sequence-wise balance loss coefficient alpha
    # Multi-Token Prediction (report section 2.2)
    mtp_depth: int = 1  # D extra prediction modules; 0 switches MTP off
    # Positions: RoPE with optional YaRN extension (report section 4.3)
    max_seq_len: int = 163840  # longest sequence the position encoding supports
    original_seq_len: int = 4096  # pre-training context that YaRN extends
    rope_theta: float = 10000.0  # RoPE base
    rope_factor: float = 40.0  # YaRN scale s; 1 disables YaRN
    beta_fast: int = 32  # YaRN ramp: rotations below this many are interpolated
    beta_slow: int = 1  # YaRN ramp: rotations above this many are kept
    mscale: float = 1.0  # YaRN attention-temperature coefficient (softmax scale *= (0.1 mscale ln s + 1)^2)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.006  # std of the normal initialisation of every weight matrix

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel size (attention heads, dense FFN, shared experts, vocab)
    pipeline: int = 1  # pipeline stages
    expert: int = 1  # expert-parallel size; routed experts are split evenly over it
    # Model chunks per pipeline rank (interleaved 1F1B): rank r runs virtual stages r, r + pipeline, ...
    # of pipeline x virtual_pipeline, which shrinks the pipeline bubble by that factor. 1 = plain 1F1B.
    virtual_pipeline: int = 1
    # Layers per (virtual) pipeline stage, one entry per stage of pipeline x virtual_pipeline, in stage
    # order, e.g. [2, 2]; empty splits the layers as evenly as possible.
    pipeline_layers: list[int] = field(default_factory=list)
    gpus_per_node: int = 8  # ranks per node, used to map expert-parallel ranks to nodes


@dataclass
class PrecisionConfig:
    params_dtype: str = "bf16"  # compute dtype of the model: fp32 | bf16
    linear_impl: str = "local"  # linear layers: local (Megatron-Core) | te (Transformer Engine)
    fp8: str = "none"  # none | blockwise (1x128 / 128x128, DeepSeek-V3) | delayed | current
    fp8_dispatch: bool = False  # send the MoE dispatch payload in FP8 (GPU only)
    # The routed experts' grouped GEMM: torch (torch._grouped_mm: one stacked weight, split offsets stay
    # on the GPU, BF16/FP32), te (TE's GroupedLinear: FP8, one weight per expert; split sizes read back
    # to the host in every MoE layer unless cuBLAS allows TE's grouped-tensor path), auto (te under FP8,
    # else torch)
    expert_gemm: str = "auto"
    bf16_optimizer_moments: bool = False  # keep AdamW's moments in BF16, as the report does


@dataclass
class TrainConfig:
    seq_len: int = 4096  # tokens per training sequence
    micro_batch_size: int = 1  # sequences per rank per forward pass
    global_batch_size: int = 15360  # sequences per optimizer step once ramp-up ends
    batch_rampup_start: int = 3072  # global batch at the start of the ramp; equal to global = no ramp
    batch_rampup_tokens: float = 469e9  # tokens over which the global batch ramps up
    train_tokens: float = 14.8e12  # stop after this many tokens (or `steps`, whichever comes first)
    steps: int = 0  # stop after this many optimizer steps; 0 = decided by train_tokens
    # Learning rate by consumed tokens (report section 4.2)
    lr_schedule: str = "deepseek"  # deepseek | cosine | wsd
    lr: float = 2.2e-4  # peak learning rate
    min_lr: float = 2.2e-5  # learning rate at the end of decay
    warmup_steps: int = 2000  # linear warmup in optimizer steps
    constant_tokens: float = 10e12  # deepseek: hold peak lr until this many tokens
    decay_tokens: float = 4.3e12  # deepseek/cosine/wsd: length of the decay
    final_lrs: list[float] = field(default_factory=lambda: [2.2e-5, 7.3e-6])  # deepseek: tail constants
    final_tokens: list[float] = field(default_factory=lambda: [333e9, 167e9])  # deepseek: their lengths
    # AdamW (report section 4.2)
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    # Gradient reduction + AdamW: megatron (Megatron-Core DDP + distributed optimizer, GPUs only),
    # zero1 (ours: flat all-reduce + ZeRO-1 AdamW, any device), auto (megatron on GPUs, else zero1)
    optimizer_impl: str = "auto"
    # MoE and MTP schedules
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free balance update
    bias_update_stop_tokens: float = 14.3e12  # gamma becomes 0 after this many tokens
    mtp_loss_weight: float = 0.3  # lambda for the first mtp_weight_switch_tokens
    mtp_loss_weight_late: float = 0.1  # lambda afterwards
    mtp_weight_switch_tokens: float = 10e12
    # Robustness and reproducibility
    max_consecutive_skips: int = 5  # NaN/Inf steps in a row before the run saves and stops
    seed: int = 1234
    deterministic: bool = False  # deterministic kernels and fp32 everywhere (tests, debugging)
    # Python's garbage collector runs between steps, every N steps, not mid-step when allocations
    # trigger it (megatron_ds.train.PythonGC); 0 = Python's automatic collection
    gc_interval: int = 50
    # Selective recomputation (report section 3.2.3): any of RECOMPUTE_REGIONS (parallel/recompute.py)
    recompute: list[str] = field(default_factory=list)
    # Capture each micro-batch's forward and backward as a CUDA graph after the first steps and replay it
    # (megatron_ds/micro_batches.py): one launch instead of thousands, for launch-bound models. GPUs only;
    # bf16, no FP8 or blockwise FP8, one GPU or data parallelism, Megatron-Core's optimizer backend
    cuda_graphs: bool = False


@dataclass
class CheckpointConfig:
    save_interval_steps: int = 1000  # save every N optimizer steps; 0 disables
    save_interval_minutes: float = 0.0  # also save when this much wall time passed; 0 disables
    keep_last: int = 3  # checkpoints kept; older ones are deleted after a successful save
    async_save: bool = False  # write in a background thread so training continues
    load: str = ""  # checkpoint to start from; empty = RUN_DIR/checkpoints/latest if it exists
    save_on_exit: bool = True  # save when the run ends or is signalled


@dataclass
class LoggingConfig:
    log_interval: int = 1  # steps between metric records
    tensorboard: bool = True  # write TensorBoard event files into the run directory
    progress_bar: bool = True  # live progress bar with ETA on rank 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
