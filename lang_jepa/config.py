"""One typed configuration tree.

Precedence: dataclass defaults < preset or YAML file (``--config``) < dotted ``key.sub=value``
overrides. OmegaConf's structured configs reject unknown keys and wrong types at start-up and name
the key; :func:`validate` adds the cross-field checks (batch arithmetic, shapes, ranges).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESET_DIR = Path(__file__).parent / "configs"
# The values of ``objective``: the keys of lang_jepa.objectives.OBJECTIVES (checked there at import;
# kept here so that reading a config imports no model or engine code).
OBJECTIVE_NAMES = ("jepa", "mlm", "jepa+mlm", "decoder")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


@dataclass
class ModelConfig:
    """The encoder (context encoder; the EMA target encoder is a copy of it)."""

    vocab_size: int = 0  # 0: take it from the shards' manifest
    seq_len: int = 512  # window length in tokens (whole sentences only)
    dim: int = 768  # width D
    depth: int = 12  # transformer blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    pos: str = "rope"  # rope | learned (both take explicit position ids)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each transformer block (fuses norms, GELU, residuals)
    init_std: float = 0.02
    # pre_ln (this project's encoder) | bert (post-LN, learned absolute positions, token-type and
    # embedding LayerNorm, exact GELU: BERT / MiniLM checkpoints load into it exactly)
    arch: str = "pre_ln"
    max_positions: int = 0  # learned position rows (0: seq_len); a BERT checkpoint's 512
    # a BERT-family Hugging Face checkpoint (config.json + model.safetensors, e.g. MiniLM) to
    # start from: the encoder (and the EMA target, its copy) get its weights, and the
    # architecture fields above are taken from its config.json
    init_from: str | None = None


@dataclass
class PredictorConfig:
    """The narrow predictor: context features projected down + mask tokens at target positions."""

    dim: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0


@dataclass
class DataConfig:
    shards: str = "data/demo/shards"  # directory holding manifest.json
    tokenizer: str | None = None  # if set, must be the shards' tokenizer (compared by sha256)
    micro_batch_size: int = 8  # windows per rank per forward (packed: micro_batch x seq_len tokens)
    packing: bool = True  # train batches: windows packed into one row, block-diagonal attention
    num_workers: int = 1  # DataLoader workers per rank
    prefetch_factor: int = 4
    shuffle_buffer: int = 1000  # windows held for the sample-level shuffle
    min_sentences: int = 3  # windows with fewer sentences are skipped (and counted)
    pin_memory: bool = True
    # each shard's sha256 checked when a loader process first opens it, and every token id
    # against the vocabulary (a damaged shard is refused, naming it, before it reaches the model)
    verify_shards: bool = True


@dataclass
class MaskConfig:
    """Target blocks: runs of whole consecutive sentences; the context is every other sentence."""

    min_blocks: int = 2
    max_blocks: int = 4
    min_block_frac: float = 0.15  # of the window's tokens, per block
    max_block_frac: float = 0.25
    min_context_frac: float = 0.25  # the context keeps at least this share of the tokens
    # how the predictor is told about a hidden sentence. 0: a mask token at each of its token
    # positions (I-JEPA), so the predictor knows its length. K > 0: K query tokens per hidden
    # sentence, and the context and the queries renumbered so that every hidden sentence spans K
    # positions: the predictor learns where a sentence is missing, not how long it is (the
    # target encoder still reads the window at its true positions)
    queries: int = 0
    # multi-mask (data2vec 2.0): M mask draws of every training window, each laid out as its own
    # row(s) of context and predictions, while the target encoder reads the window once for all
    # of them (the validation batches keep one draw)
    draws: int = 1
    # what a target block is. sentence: a run of whole consecutive sentences (the blocks above).
    # span: a run of span_min..span_max tokens inside one sentence, the rest of the sentence left
    # in the context, spans drawn until span_frac of the window's tokens are hidden; each span is
    # one target slot. The neighbouring words then say much of what is missing (data2vec's and
    # SpanBERT's regime), where a whole hidden sentence is barely predictable from the others
    unit: str = "sentence"
    span_min: int = 3
    span_max: int = 10
    span_frac: float = 0.2


@dataclass
class TargetConfig:
    """What the EMA target encoder gives the predictor to match (data2vec's choices)."""

    tensor: str = "final"  # final (the encoder's output) | block (each block's output) | ffn
    #                        (each block's FFN output before its residual, data2vec)
    layers: int = 1  # block | ffn: the average of the top-K blocks (final: must be 1)
    norm: str = "layer"  # each layer before averaging: layer (no affine) | instance | none
    level: str = "sentence"  # sentence: each target sentence's mean | token: every target token
    # window: the target encoder reads the whole window (I-JEPA) | sentence: each sentence of the
    # window alone (block-diagonal attention per sentence), as the export embeds a sentence
    view: str = "window"
    # ema: the EMA target encoder under no-grad (I-JEPA, data2vec) | online: the trainable encoder
    # itself, gradient through the targets, no stop-gradient (LeJEPA; pair with loss.reg=sigreg,
    # loss.reg_on=targets, or loss.type=infonce, which keep it from collapsing)
    source: str = "ema"
    # online only: hidden width of a projector (Linear, LayerNorm, GELU, Linear back to model.dim)
    # between the pooled target embeddings and the loss, as SimCLR's projection head and LeJEPA's
    # projector: the loss, SIGReg and the predictions live in the projector's space, the export
    # stays the encoder's pooled embedding (0: no projector, the loss on the embedding itself)
    projector: int = 0


@dataclass
class LossConfig:
    type: str = "smooth_l1"  # smooth_l1 | l2 | cosine | infonce (contrastive only)
    smooth_l1_beta: float = 1.0
    # InfoNCE: each prediction scored against every target of the micro-batch (the same window's
    # other targets are the hard negatives); added with this weight to a regression type
    infonce_weight: float = 0.0
    temperature: float = 0.1
    # InfoNCE's candidates. batch: every target of the micro-batch (the same window's among them).
    # window: the same window's other targets only, so that a prediction must tell the hidden
    # sentences of one window apart, which the topic of the document cannot do
    negatives: str = "batch"
    # InfoNCE's extra negatives: the last K targets of this rank's training micro-batches, kept
    # (detached, unit norm) in a queue that moves with the run (MoCo); 0: the micro-batch's only
    queue: int = 0
    reg: str = "none"  # none | vicreg | sigreg
    # predictions | context (the context encoder's token features) | targets (the target-sentence
    # embeddings: the encoder's own pooled embeddings under target.source=online) | pooled (the
    # same sentences' mean-pooled features before the layer norm, where a low-rank set cannot pass
    # for Gaussian behind a fixed norm), or several joined by "+" (targets+context), each its own
    # term at reg_weight
    reg_on: str = "predictions"
    reg_weight: float = 0.0
    vicreg_cov_weight: float = 0.04  # covariance / variance weight inside the vicreg term
    sigreg_slices: int = 64  # random 1-D projections per SIGReg evaluation (LeJEPA: ~1024)
    mlm_prob: float = 0.15  # objective=mlm: share of tokens predicted (BERT's 80/10/10 corruption)
    mlm_weight: float = 1.0  # objective=jepa+mlm: weight of the token loss beside the latent loss
    # objective=jepa+mlm: the token loss alone before step latent_start, then the latent loss's
    # weight rises linearly from 0 to 1 over latent_ramp steps (the collapse alarm waits for it)
    latent_start: int = 0
    latent_ramp: int = 0
    # objective=jepa+mlm: what the token loss reads. context: the context encoder's features of
    # the context tokens (one forward for both losses; a hidden sentence's tokens are never
    # predicted, so it predicts mlm_prob x the context's share of the window's tokens). window: a
    # second forward over the whole window corrupted as objective=mlm corrupts it (the control's
    # tokens a step), the context forward then reading clean tokens
    mlm_on: str = "context"
    # objective=jepa+mlm with mlm_on=window: the first block the latent loss's gradient reaches.
    # 0: the embeddings and every block. k > 0: blocks k.. only; the embeddings and the blocks
    # below k are trained by the token loss alone (the context forward runs them without grad)
    latent_grad_from: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    start_lr: float = 2e-4  # at step 0, linear warmup to lr
    min_lr: float = 1e-6  # end of the cosine
    warmup_steps: int = 1000
    weight_decay: float = 0.04  # cosine 0.04 -> 0.4 (I-JEPA)
    final_weight_decay: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    ema_start: float = 0.996  # target-encoder momentum, linear to ema_end
    ema_end: float = 1.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    max_steps: int = 10000  # optimizer steps
    global_batch_size: int = 0  # 0: micro_batch_size * world_size * grad_accum_steps
    grad_accum_steps: int = 1
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 where the GPU or CPU has it natively)
    seed: int = 0
    resume: str = "auto"  # auto | none | a checkpoint path
    log_interval: int = 10
    save_interval: int = 1000
    keep_checkpoints: int = 3
    exit_at_step: int = 0  # >0: checkpoint and exit (code 0) on reaching this step; schedules still
    # follow max_steps (Megatron's exit-interval: split one run over several jobs)
    nonfinite: str = "stop"  # stop | skip: a NaN/inf loss stops the run, or its step is skipped
    max_skipped_steps: int = 100  # with nonfinite=skip, stop after this many skipped steps
    val_interval: int = 500  # 0 disables validation
    val_batches: int = 8  # per rank, the same on every rank
    # the process group's timeout: a collective that waits this long for a lost rank fails, and
    # the survivors exit 75 (requeue) naming the lost ranks and the last good checkpoint
    collective_timeout_s: float = 600.0


@dataclass
class LogConfig:
    tensorboard: bool = True
    rankme_window: int = 16  # batches of pooled embeddings for the effective rank


@dataclass
class EvalConfig:
    """Evaluation during training and the collapse alarm."""

    interval: int = 0  # every N steps: the cheap subset of the eval suite -> eval/* (0: off)
    batches: int = 4  # validation batches that subset reads
    collapse_min_rank_frac: float = 0.02  # alarm: RankMe of pooled targets < this x model.dim
    collapse_min_target_std: float = 0.05  # alarm: mean per-dimension std of targets below this
    collapse_min_pred_std: float = 0.01  # alarm: mean per-dimension std of predictions below this
    collapse_patience: int = 3  # consecutive logging checks under a threshold before the alarm
    collapse_stop: bool = False  # stop the run (exit 3) when the alarm trips
    # checks up to this step do not count (-1: until the learning-rate warmup ends, or the ramp of
    # a delayed latent loss, loss.latent_start + loss.latent_ramp, if later): a freshly
    # initialised predictor outputs near-constant predictions (std ~0.005) before it has learnt
    collapse_after_step: int = -1


@dataclass
class DecoderConfig:
    """``objective=decoder``: a concept decoder trained on a frozen exported encoder's sentence
    embeddings (:mod:`lang_jepa.decoder`)."""

    encoder: str = ""  # the export directory (python -m lang_jepa.export) whose embeddings it reads
    dim: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    prefix: int = 4  # vectors the embedding is projected to, before the tokens
    max_tokens: int = 64  # tokens per sentence it learns to write (longer ones are cut, counted)


@dataclass
class Config:
    objective: str = (
        "jepa"  # jepa | mlm (the masked-LM control) | jepa+mlm | decoder (lang_jepa.decoder)
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
    return preset


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < preset/YAML < ``key.sub=value`` overrides, type-checked and validated."""
    schema = OmegaConf.structured(Config)
    layers: list[Any] = [schema]
    try:
        if preset:
            layers.append(OmegaConf.load(_preset_path(preset)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key.sub=value")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config key {key!r}: {first_line}") from err
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {msg}")


# Ranges of single values: key -> (low, high, whether low is allowed). None: unbounded.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    **dict.fromkeys(
        ["model.dim", "model.depth", "model.heads", "model.mlp_ratio", "model.rope_theta",
         "model.norm_eps", "model.init_std", "predictor.dim", "predictor.depth", "predictor.heads",
         "predictor.mlp_ratio", "data.prefetch_factor", "data.shuffle_buffer", "train.val_batches",
         "eval.batches", "log.rankme_window", "loss.smooth_l1_beta", "loss.temperature",
         "loss.sigreg_slices", "target.layers"],
        (0, None, False),
    ),  # sizes > 0
    **dict.fromkeys(
        ["model.vocab_size", "data.num_workers", "data.min_sentences", "optim.warmup_steps",
         "optim.grad_clip", "optim.weight_decay", "optim.final_weight_decay", "optim.eps",
         "train.global_batch_size", "train.save_interval", "train.keep_checkpoints",
         "train.exit_at_step", "train.max_skipped_steps", "train.val_interval", "eval.interval",
         "eval.collapse_patience", "eval.collapse_min_target_std", "eval.collapse_min_pred_std",
         "loss.reg_weight", "loss.vicreg_cov_weight", "loss.infonce_weight", "loss.mlm_weight",
         "loss.latent_start", "loss.latent_ramp", "loss.latent_grad_from"],
        (0, None, True),
    ),  # counts and weights >= 0
    **dict.fromkeys(["optim.lr", "optim.start_lr", "optim.min_lr"], (0, None, True)),  # LR >= 0
    **dict.fromkeys(
        ["model.dropout", "eval.collapse_min_rank_frac", "optim.ema_start", "optim.ema_end"],
        (0, 1, True),
    ),  # fractions and momenta in [0, 1]
}  # fmt: skip


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_ranges(cfg: Config) -> None:
    """Every key of :data:`RANGES` inside its range, or a ConfigError naming the key."""
    for key, (low, high, low_ok) in RANGES.items():
        v = _value(cfg, key)
        bad = (low is not None and (v < low or (v == low and not low_ok))) or (
            high is not None and v > high
        )
        if bad:
            lo = "(-inf" if low is None else ("[" if low_ok else "(") + f"{low:g}"
            hi = "inf)" if high is None else f"{high:g}]"
            raise ConfigError(f"config key {key!r}: {v} is out of range {lo}, {hi}")


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express; errors name the key."""
    m, p, mk, o, t = cfg.model, cfg.predictor, cfg.mask, cfg.optim, cfg.train
    check_ranges(cfg)
    _check(
        m.dim % m.heads == 0, "model.heads", f"model.dim={m.dim} is not divisible by it ({m.heads})"
    )
    _check(
        p.dim % p.heads == 0, "predictor.heads", f"predictor.dim={p.dim} not divisible by {p.heads}"
    )
    if m.pos == "rope":
        _check((m.dim // m.heads) % 2 == 0, "model.heads", "rope needs an even head dimension")
        _check((p.dim // p.heads) % 2 == 0, "predictor.heads", "rope needs an even head dimension")
    _check(m.pos in ("rope", "learned"), "model.pos", f"{m.pos!r} is not rope | learned")
    _check(m.seq_len >= 8, "model.seq_len", "must be >= 8")
    _check(
        1 <= mk.min_blocks <= mk.max_blocks, "mask.max_blocks", "need 1 <= min_blocks <= max_blocks"
    )
    _check(
        0 < mk.min_block_frac <= mk.max_block_frac < 1,
        "mask.max_block_frac",
        "need 0 < min_block_frac <= max_block_frac < 1",
    )
    _check(0 <= mk.min_context_frac < 1, "mask.min_context_frac", "must be in [0, 1)")
    _check(mk.queries >= 0, "mask.queries", f"{mk.queries} is negative")
    _check(mk.draws >= 1, "mask.draws", f"{mk.draws} is not a positive number of draws")
    _check(mk.unit in ("sentence", "span"), "mask.unit", f"{mk.unit!r} is not sentence | span")
    if mk.unit == "span":
        _check(
            1 <= mk.span_min <= mk.span_max,
            "mask.span_max",
            "need 1 <= span_min <= span_max tokens",
        )
        _check(
            0 < mk.span_frac <= 1 - mk.min_context_frac,
            "mask.span_frac",
            f"{mk.span_frac} is not in (0, 1 - mask.min_context_frac]",
        )
        _check(
            mk.queries == 0 and mk.draws == 1 and cfg.objective in ("jepa", "jepa+mlm"),
            "mask.unit",
            "spans need a latent objective (jepa, jepa+mlm), mask.queries=0 (queries stand for "
            "whole hidden sentences) and mask.draws=1 (the draws' spans of a window overlap in "
            "part, so none is another's copy)",
        )
    _check(
        mk.draws == 1 or cfg.objective in ("jepa", "jepa+mlm"),
        "mask.draws",
        f"several draws need a latent objective (jepa, jepa+mlm), not {cfg.objective!r}",
    )
    _check(
        mk.queries == 0 or (m.pos == "rope" and cfg.target.level == "sentence"),
        "mask.queries",
        "query tokens need model.pos=rope (renumbered positions) and target.level=sentence "
        "(one prediction per sentence, not per token)",
    )
    _check(
        cfg.objective in OBJECTIVE_NAMES,
        "objective",
        f"{cfg.objective!r} is not one of {' | '.join(OBJECTIVE_NAMES)}",
    )
    dc = cfg.decoder
    _check(
        cfg.objective != "decoder" or bool(dc.encoder),
        "decoder.encoder",
        "objective=decoder needs the export directory of the encoder it decodes",
    )
    _check(dc.dim % dc.heads == 0, "decoder.dim", f"{dc.dim} is not a multiple of decoder.heads")
    _check(dc.prefix >= 1 and dc.max_tokens >= 1, "decoder.prefix", "prefix and max_tokens >= 1")
    _check(0 < cfg.loss.mlm_prob < 1, "loss.mlm_prob", "must be in (0, 1)")
    _check(
        cfg.loss.type in ("smooth_l1", "l2", "cosine", "infonce"),
        "loss.type",
        f"{cfg.loss.type!r} is not smooth_l1 | l2 | cosine | infonce",
    )
    _check(
        cfg.loss.negatives in ("batch", "window"),
        "loss.negatives",
        f"{cfg.loss.negatives!r} is not batch | window",
    )
    _check(
        cfg.loss.negatives == "batch" or cfg.loss.type == "infonce" or cfg.loss.infonce_weight > 0,
        "loss.negatives",
        "window negatives need InfoNCE (loss.type=infonce or loss.infonce_weight > 0)",
    )
    _check(
        cfg.loss.negatives == "batch" or cfg.objective in ("jepa", "jepa+mlm"),
        "loss.negatives",
        f"window negatives need a latent objective (jepa, jepa+mlm), not {cfg.objective!r}",
    )
    _check(cfg.loss.queue >= 0, "loss.queue", f"{cfg.loss.queue} < 0")
    _check(
        cfg.loss.queue == 0 or cfg.loss.type == "infonce" or cfg.loss.infonce_weight > 0,
        "loss.queue",
        "a queue of negatives needs InfoNCE (loss.type=infonce or loss.infonce_weight > 0)",
    )
    _check(
        cfg.loss.queue == 0 or cfg.loss.negatives == "batch",
        "loss.queue",
        "a queue of other windows' targets contradicts loss.negatives=window",
    )
    _check(
        cfg.loss.queue == 0 or cfg.objective in ("jepa", "jepa+mlm"),
        "loss.queue",
        f"a queue of negatives needs a latent objective (jepa, jepa+mlm), not {cfg.objective!r}",
    )
    for key in ("latent_start", "latent_ramp"):
        _check(
            getattr(cfg.loss, key) == 0 or cfg.objective == "jepa+mlm",
            f"loss.{key}",
            f"delays the latent loss beside the token loss (objective=jepa+mlm), not {cfg.objective!r}",
        )
    _check(
        cfg.loss.mlm_on in ("context", "window"),
        "loss.mlm_on",
        f"{cfg.loss.mlm_on!r} not context | window",
    )
    _check(
        cfg.loss.mlm_on == "context" or (cfg.objective == "jepa+mlm" and cfg.mask.draws == 1),
        "loss.mlm_on",
        "window: the hybrid's token loss over the whole window needs objective=jepa+mlm and "
        "mask.draws=1",
    )
    _check(
        cfg.loss.latent_grad_from == 0
        or (cfg.loss.mlm_on == "window" and cfg.target.source == "ema"),
        "loss.latent_grad_from",
        "keeps the latent loss out of the lower blocks, which the token loss must then train on "
        "its own: it needs loss.mlm_on=window (a token loss of its own forward) and EMA targets "
        "(target.source=ema: online targets would carry the latent loss into every block)",
    )
    _check(
        cfg.loss.latent_grad_from < cfg.model.depth,
        "loss.latent_grad_from",
        f"{cfg.loss.latent_grad_from} leaves none of the {cfg.model.depth} blocks to the latent loss",
    )
    _check(cfg.loss.reg in ("none", "vicreg", "sigreg"), "loss.reg", f"{cfg.loss.reg!r} unknown")
    reg_on = cfg.loss.reg_on.split("+")
    _check(
        all(on in ("predictions", "context", "targets", "pooled") for on in reg_on)
        and len(set(reg_on)) == len(reg_on),
        "loss.reg_on",
        f"{cfg.loss.reg_on!r} is not predictions | context | targets | pooled, or several joined "
        "by +",
    )
    tg = cfg.target
    _check(
        tg.tensor in ("final", "block", "ffn"),
        "target.tensor",
        f"{tg.tensor!r} not final | block | ffn",
    )
    _check(
        tg.norm in ("layer", "instance", "none"),
        "target.norm",
        f"{tg.norm!r} is not layer | instance | none",
    )
    _check(tg.level in ("sentence", "token"), "target.level", f"{tg.level!r} not sentence | token")
    _check(tg.view in ("window", "sentence"), "target.view", f"{tg.view!r} not window | sentence")
    _check(tg.source in ("ema", "online"), "target.source", f"{tg.source!r} is not ema | online")
    _check(
        not {"targets", "pooled"} & set(reg_on) or cfg.loss.reg == "none" or tg.source == "online",
        "loss.reg_on",
        "targets, pooled: the EMA targets carry no gradient; regularise them with "
        "target.source=online",
    )
    _check(tg.projector >= 0, "target.projector", f"{tg.projector} is negative")
    _check(
        tg.projector == 0 or tg.source == "online",
        "target.projector",
        "a projector needs target.source=online (the EMA target encoder has no copy of it)",
    )
    _check(tg.layers <= m.depth, "target.layers", f"{tg.layers} > model.depth ({m.depth})")
    _check(
        tg.tensor != "final" or tg.layers == 1,
        "target.layers",
        "target.tensor=final is one tensor: use block or ffn to average the top K",
    )
    _check(cfg.eval.collapse_after_step >= -1, "eval.collapse_after_step", "must be >= -1")
    _check(len(o.betas) == 2, "optim.betas", "needs two values")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", f"{o.betas} not in [0, 1)")
    _check(
        0 <= o.ema_start <= o.ema_end <= 1, "optim.ema_end", "need 0 <= ema_start <= ema_end <= 1"
    )
    _check(
        t.precision in ("auto", "bf16", "fp32"),
        "train.precision",
        f"{t.precision!r} is not auto | bf16 | fp32",
    )
    _check(t.max_steps > 0, "train.max_steps", "must be positive")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    _check(cfg.data.micro_batch_size >= 1, "data.micro_batch_size", "must be >= 1")
    _check(t.log_interval >= 1, "train.log_interval", "must be >= 1")
    _check(
        t.nonfinite in ("stop", "skip"), "train.nonfinite", f"{t.nonfinite!r} is not stop | skip"
    )
    _check(
        t.resume in ("auto", "none") or len(t.resume) > 0, "train.resume", "auto | none | a path"
    )


def resolve_batch(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """(micro_batch, grad_accum, global_batch) consistent with the world size, or ConfigError.

    ``train.global_batch_size`` may be 0 (derived) or a value that must equal
    micro * world * accum; when it is set and accumulation is left at 1, accumulation is derived.
    """
    micro, accum, glob = (
        cfg.data.micro_batch_size,
        cfg.train.grad_accum_steps,
        cfg.train.global_batch_size,
    )
    if glob == 0:
        return micro, accum, micro * world_size * accum
    if accum == 1 and glob % (micro * world_size) == 0:
        accum = glob // (micro * world_size)
    if micro * world_size * accum != glob:
        raise ConfigError(
            f"config key 'train.global_batch_size': {glob} != data.micro_batch_size ({micro}) x "
            f"world size ({world_size}) x train.grad_accum_steps ({accum})"
        )
    return micro, accum, glob


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys added after results were recorded, each with the value that reproduces the code before
# it. A result's fingerprint (lang_jepa.experiment) leaves such a key out while it holds that
# value, so a new lever does not invalidate the cells recorded before it existed.
INERT_DEFAULTS: dict[str, Any] = {
    "target.projector": 0,
    "mask.queries": 0,
    "loss.negatives": "batch",
    "mask.draws": 1,
    "mask.unit": "sentence",
    "loss.queue": 0,
    "loss.latent_start": 0,
    "loss.latent_ramp": 0,
    "loss.mlm_on": "context",
    "loss.latent_grad_from": 0,
}


# Keys that only count under another key's value: (key, the value it needs, the keys it governs).
# A result's fingerprint leaves the governed keys out while the key has another value.
GOVERNED_KEYS: tuple[tuple[str, Any, tuple[str, ...]], ...] = (
    ("mask.unit", "span", ("mask.span_min", "mask.span_max", "mask.span_frac")),
)


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
