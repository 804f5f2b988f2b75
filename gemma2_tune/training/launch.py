"""Multi-process launching: shipped accelerate configs, recipe/launch consistency, `--launch`.

Two ways in, one set of rules:
  accelerate launch --config_file accelerate_configs/X.yaml -m gemma2_tune COMMAND ...   (ranks read ACCELERATE_* env)
  gemma2-tune COMMAND --launch X --num-processes N ...     (we read X.yaml, check, then run accelerate launch)
for any training command (every method of training/methods.py).
Either way `launch_problems` is applied before any model is loaded. Light module: no torch import.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config.schema import RunConfig
from ..errors import UserError

OFFLOAD_DEVICES = ("cpu", "nvme")  # accelerate's offload_optimizer_device values that move states off the GPU
CONFIG_DIR = Path(__file__).resolve().parents[1] / "bundled" / "accelerate_configs"
ALIASES = {"zero3": "deepspeed_zero3", "zero3_offload": "deepspeed_zero3_offload", "ddp": "multi_gpu",
           "single": "single_gpu"}
PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


@dataclass(frozen=True)
class Launch:
    """What matters about how the processes were (or will be) started."""

    mode: str  # "single", "ddp", "deepspeed", "fsdp"
    num_processes: int = 1
    zero_stage: int | None = None
    zero3_init: bool = False
    zero3_save_16bit: bool = False
    mixed_precision: str | None = None  # "bf16", "fp16", "no"
    config_file: str | None = None
    offload: bool = False  # DeepSpeed keeps optimizer states (and master weights) in CPU memory or on NVMe

    # Capabilities: what the launch does, derived once here; every rule elsewhere asks these, never the mode.
    # Another sharded engine (FSDP2) is one more case in each, not edits across the code.
    @property
    def shards_parameters(self) -> bool:
        """Each process holds a slice of every weight (DeepSpeed ZeRO stage 3): weights are gathered around
        each module's forward, and code that reads a weight directly (a fused loss, EMA, kernel probes,
        compiled layers) sees only its slice."""
        return self.mode == "deepspeed" and self.zero_stage == 3

    @property
    def sharded_init(self) -> bool:
        """Weights are sharded as they load (zero3_init_flag): needed for QLoRA under sharding."""
        return self.shards_parameters and self.zero3_init

    @property
    def consolidates_on_save(self) -> bool:
        """A full model is saved as one consolidated checkpoint (zero3_save_16bit_model) rather than shards;
        always true without sharding."""
        return not self.shards_parameters or self.zero3_save_16bit

    @property
    def places_weights(self) -> bool:
        """The engine places weights on devices itself: quantized weights get no device_map at load time."""
        return self.shards_parameters

    @property
    def reentrant_checkpointing(self) -> bool:
        """PEFT under sharded parameters needs reentrant gradient checkpointing (TRL enforces it)."""
        return self.shards_parameters

    @property
    def reads_whole_weights(self) -> bool:
        """Code may read a whole weight outside a module's forward (EMA, the tiled and fused losses, probes,
        torch.compile): false when parameters are sharded."""
        return not self.shards_parameters

    @property
    def sharding(self) -> str:
        """The sharded engine in words, for messages ('ZeRO-3'), or '' without one."""
        return "ZeRO-3" if self.shards_parameters else ""

    def describe(self) -> str:
        """'deepspeed ZeRO-3, 8 processes'."""
        extra = f" ZeRO-{self.zero_stage}" if self.mode == "deepspeed" else ""
        return f"{self.mode}{extra}, {self.num_processes} process{'es' if self.num_processes > 1 else ''}"


def bundled_launch_configs() -> list[str]:
    """Names of the accelerate configs shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_launch_config(name: str) -> Path:
    """A path as given, or a bundled config by name or short name (zero3, ddp, ...). Raises UserError."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    stem = ALIASES.get(name, name.removesuffix(".yaml"))
    bundled = CONFIG_DIR / f"{stem}.yaml"
    if bundled.is_file():
        return bundled
    known = ", ".join(bundled_launch_configs() + sorted(ALIASES))
    raise UserError(f"--launch {name}: no such accelerate config file or bundled name (bundled: {known})")


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def read_launch_config(path: Path, num_processes: int | None = None) -> Launch:
    """An accelerate config file -> Launch (`num_processes` overrides the file's). Raises UserError."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read accelerate config ({exc})") from None
    kind = str(data.get("distributed_type", "NO")).upper()
    ds = data.get("deepspeed_config") or {}
    mode = {"DEEPSPEED": "deepspeed", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "FSDP": "fsdp"}.get(kind, "single")
    return Launch(
        mode=mode,
        num_processes=int(num_processes or data.get("num_processes", 1)),
        zero_stage=int(ds["zero_stage"]) if mode == "deepspeed" and "zero_stage" in ds else None,
        zero3_init=_truthy(ds.get("zero3_init_flag", False)),
        zero3_save_16bit=_truthy(ds.get("zero3_save_16bit_model", False)),
        offload=str(ds.get("offload_optimizer_device", "none")).lower() in OFFLOAD_DEVICES,
        mixed_precision=str(data.get("mixed_precision", "no")),
        config_file=str(path),
    )


def current_launch(env: dict[str, str] | None = None) -> Launch:
    """The launch this process runs under, from the variables accelerate sets for each rank."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED", "")):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return Launch(
            mode="deepspeed",
            num_processes=world,
            zero_stage=int(stage) if stage else None,
            zero3_init=_truthy(env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "")),
            zero3_save_16bit=_truthy(env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "")),
            offload=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() in OFFLOAD_DEVICES,
            mixed_precision=env.get("ACCELERATE_MIXED_PRECISION"),
        )
    if _truthy(env.get("ACCELERATE_USE_FSDP", "")):
        return Launch("fsdp", world, mixed_precision=env.get("ACCELERATE_MIXED_PRECISION"))
    return Launch("ddp" if world > 1 else "single", world, mixed_precision=env.get("ACCELERATE_MIXED_PRECISION"))


def launch_problems(cfg: RunConfig, launch: Launch) -> list[str]:
    """Contradictions between a resolved config and how the processes are started (empty: none): the shared
    rules, then the method's own (its schema's `launch_problems`)."""
    where = f"accelerate config {launch.config_file}" if launch.config_file else "the accelerate launch"
    problems = []
    wanted = PRECISION_OF_DTYPE[cfg.model.dtype]
    if launch.mixed_precision in ("bf16", "fp16") and launch.mixed_precision != wanted:
        problems.append(f"model.dtype is {cfg.model.dtype} but {where} sets mixed_precision: {launch.mixed_precision}")
    if launch.mode == "fsdp":
        problems.append(f"{where}: FSDP is not supported by gemma2-tune yet; use a DeepSpeed ZeRO-3 config")
    if launch.shards_parameters:
        sharding = launch.sharding
        if cfg.quantization.load_in_4bit:
            if not (cfg.quant_storage == cfg.compute_dtype == cfg.model.dtype):
                problems.append(
                    f"quantization.quant_storage, quantization.compute_dtype and model.dtype must be equal under "
                    f"{sharding} ({sharding} shards one dtype); got {cfg.quant_storage}, {cfg.compute_dtype}, "
                    f"{cfg.model.dtype}"
                )
            if not launch.sharded_init:
                problems.append(f"{where}: deepspeed_config.zero3_init_flag must be true for QLoRA under {sharding}")
        for frozen in cfg.frozen_models():
            if frozen.load_in != "full":
                problems.append(f"{frozen.key}.load_in is {frozen.load_in} but {sharding} shards the {frozen.key}'s "
                                f"weights: set {frozen.key}.load_in=full (unquantized in model.dtype, split over the "
                                "processes)")
        if cfg.training.ema_decay is not None:
            problems.append(f"training.ema_decay is set but {sharding} shards the weights it averages; keep the "
                            "average on one GPU or under DDP (--launch ddp), or unset training.ema_decay")
        if not cfg.lora.enabled and not launch.consolidates_on_save:
            problems.append(
                f"{where}: deepspeed_config.zero3_save_16bit_model must be true for full fine-tuning under "
                f"{sharding}, or the saved model is not a consolidated checkpoint"
            )
    return problems + cfg.launch_problems(launch)


def machine_slots() -> tuple[int, str]:
    """How many processes this machine can run, and in what words."""
    gpus = _visible_gpus()
    if gpus:
        return gpus, f"{gpus} GPU{'s' if gpus > 1 else ''}"
    cores = os.cpu_count() or 1
    return cores, f"no GPU and {cores} CPU cores"


def _visible_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return 0


def accelerate_command(command: str, config_file: Path, num_processes: int, resolved_recipe: Path,
                       extra: list[str]) -> list[str]:
    """`python -m accelerate.commands.launch ... -m gemma2_tune COMMAND --recipe RESOLVED ...`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(num_processes), "-m", "gemma2_tune", command, "--recipe", str(resolved_recipe),
            *extra]


def check_launch(cfg: RunConfig, name: str, num_processes: int | None) -> tuple[Path, Launch]:
    """Every problem with launching this config this way, found before any process starts.

    Returns the accelerate config file and the launch it describes; raises UserError listing the problems.
    """
    path = find_launch_config(name)
    launch = read_launch_config(path, num_processes)
    slots, words = machine_slots()
    problems = launch_problems(cfg, launch)
    if launch.num_processes < 1:
        problems.append(f"--num-processes {launch.num_processes}: must be at least 1")
    elif launch.num_processes > slots:
        problems.append(f"--num-processes {launch.num_processes}: this machine has {words}")
    if problems:
        raise UserError("cannot launch:\n" + "\n".join(f"  - {p}" for p in problems))
    return path, launch


def run_launch(command: str, path: Path, launch: Launch, config_yaml: str, extra: list[str], echo=print) -> int:
    """Start accelerate running `command` on the resolved config (one file every rank reads); returns its
    exit code. Ctrl-C reaches every rank from the terminal, and they stop with a checkpoint: this process waits
    for them (subprocess.run would kill the launcher a quarter of a second after it)."""
    with tempfile.TemporaryDirectory(prefix="gemma2-tune-launch-") as tmp:
        resolved = Path(tmp) / "resolved-config.yaml"
        resolved.write_text(config_yaml)
        cmd = accelerate_command(command, path, launch.num_processes, resolved, extra)
        echo("launching: " + shlex.join(cmd))
        proc = subprocess.Popen(cmd)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                echo("Ctrl-C: the processes finish their step, save a checkpoint and stop; waiting for them")
