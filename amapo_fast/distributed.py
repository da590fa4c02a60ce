"""Process group setup and the two scale-out backends behind one small interface.

`Fsdp2Engine` shards each decoder layer and then the root with `fully_shard` (FSDP2); `DeepSpeedEngine`
hands the policy to DeepSpeed ZeRO-3. Each is built from `load`, a `load_policy` partial that the engine calls
so that no rank holds a whole model it does not need: FSDP2 reads the weights on rank 0 only, the other ranks
build the model on the meta device; ZeRO-3 partitions the parameters as they load. Both expose: `policy`
(the `PreferencePolicy`), `model` (the module to call), `backward(loss, last)` per micro-batch, `step()` per
optimizer step (returns the gradient norm; a step whose norm is NaN or infinite is not applied), `lr`,
`save(dir)`/`load(dir)` for sharded checkpoints, `full_state_dict()` for the final Hugging Face folder, and
`frozen(load)` to load and shard DPO's reference model the same way.
"""
import contextlib
import dataclasses
import functools
import math
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join torchrun's process group (gloo on CPU, NCCL on GPU), or form a one-process group without torchrun."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:  # launched by torchrun (or another launcher that sets the env:// variables)
            dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
        else:  # a plain `python amapo_fast/train.py`: a process group of one, no ports needed
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's zero.Init reads it, as torchrun would set it
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


@contextlib.contextmanager
def local_main_first():
    """Local rank 0 of each node runs the block first (e.g. a cached tokenization); the others then reuse it."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        dist.barrier()
    try:
        yield
    finally:
        if first:
            dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: torch.nn.Module, device: torch.device):
    """Every rank takes rank 0's buffers. Non-persistent ones (rotary `inv_freq`, ...) are not in the state dict,
    and a rank that built the model on the meta device has no values for them."""
    for submodule in module.modules():
        for name, buffer in submodule.named_buffers(recurse=False):
            value = buffer if dist.get_rank() == 0 else torch.empty_like(buffer, device=device)
            dist.broadcast(value, src=0)
            setattr(submodule, name, value)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    warmup_steps: int
    total_steps: int
    max_grad_norm: float
    gradient_accumulation_steps: int
    micro_batch_size: int
    bf16: bool
    cpu_offload: bool


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of the optimizer step that follows `step` scheduler steps (0-based).

    A linear warmup that starts above zero, (step + 1) / (warmup_steps + 1), then transformers' cosine decay.
    transformers' `get_cosine_schedule_with_warmup` starts its warmup at exactly 0, so the first optimizer
    step of every warmed-up run would leave the weights unchanged, and a short run (one step with warmup 1)
    would not train at all.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_schedule(optimizer, optim: OptimConfig):
    from torch.optim.lr_scheduler import LambdaLR

    factor = functools.partial(warmup_cosine_factor, warmup_steps=optim.warmup_steps, total_steps=optim.total_steps)
    return LambdaLR(optimizer, factor)


def trainable_parameters(model) -> list:
    """The parameters the optimizer updates: all of them, or only the adapters when the base is frozen."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def _checkpoint_options(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Loading is strict unless frozen weights were left out on purpose.
    everything_trains = all(parameter.requires_grad for parameter in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=everything_trains)


def _trainable_state(model, optimizer) -> tuple[dict, dict]:
    """DCP's model and optimizer state without frozen weights (an adapter run's base is not saved again: a
    resumed run loads it as it started). Every name of a shared frozen weight is left out, the fused head's
    alias of the lm_head weight included, which torch's own filter keeps."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_checkpoint_options(model))
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {key: value for key, value in model_state.items() if key not in frozen}, optimizer_state


class Fsdp2Engine:
    """FSDP2: `fully_shard` per decoder layer, then the root; fp32 master weights, bf16 compute if asked."""

    def __init__(self, load, env: DistEnv, optim: OptimConfig):
        self.env, self.optim = env, optim
        self.policy = self.model = self._load_sharded(load)
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(self.model), lr=optim.learning_rate, betas=optim.betas, eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.scheduler = cosine_schedule(self.optimizer, optim)

    def _load_sharded(self, load, trainable=True):
        """Rank 0 alone reads the weights; the others build the model on the meta device (no host memory) and
        receive their shards from rank 0 once the model is sharded. Random init ('toy') is rank 0's, too."""
        policy = load(empty=not self.env.is_main)
        if not trainable:  # a trainable policy keeps what its loader froze (the base under adapters)
            policy.requires_grad_(False)
        # Taken before sharding, while rank 0's parameters are still whole; released once broadcast.
        full_state = policy.state_dict() if self.env.is_main else {}
        self._shard(policy)
        self._fill_from_rank0(policy, full_state)
        return policy

    def _fill_from_rank0(self, policy, full_state: dict):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if not self.env.is_main:
            # Allocate the meta shards where FSDP2 keeps them (CPUOffloadPolicy: on the host), values to follow.
            policy.to_empty(device="cpu" if self.optim.cpu_offload else self.env.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(policy, full_state, options=options)
        broadcast_buffers(policy, self.env.device)

    def _shard(self, policy):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        from .model import decoder_layers

        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        options = {"mesh": mesh}
        if self.optim.bf16:
            # Inputs are token ids, and DPO's reference log-probs must stay fp32: no input casting.
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        if self.optim.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for layer in decoder_layers(policy.causal_lm):
            fully_shard(layer, **options)
        # The root holds the embeddings, the final norm and the (shared) lm_head weight of the head.
        return fully_shard(policy, **options)

    def frozen(self, load):
        return self._load_sharded(load, trainable=False).eval()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]  # the rate the next optimizer step uses

    def backward(self, loss, last_micro_batch: bool):
        # Gradients are reduce-scattered only on the last micro-batch of an accumulation.
        self.model.set_requires_gradient_sync(last_micro_batch)
        (loss / self.optim.gradient_accumulation_steps).backward()

    def step(self) -> float:
        from torch.distributed.tensor import DTensor

        max_norm = self.optim.max_grad_norm if self.optim.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm = float(norm)
        if math.isfinite(norm):  # as DeepSpeed does: a NaN/inf gradient would make every weight NaN
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, directory: str):
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = _trainable_state(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(directory, "dcp"))
        if self.env.is_main:
            torch.save(self.scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))

    def load(self, directory: str):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state, optimizer_state = _trainable_state(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"))
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
            options=_checkpoint_options(self.model),
        )
        self.scheduler.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt"), weights_only=True))
        # The optimizer state carries the rate the saved run's schedule set for its next step; a resumed run
        # with another schedule (a longer --max_steps) takes its next rate from its own schedule instead.
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on rank 0 (CPU), None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return state if self.env.is_main else None


def deepspeed_config(optim: OptimConfig) -> dict:
    """The ZeRO-3 configuration, for both model construction (zero.Init) and `deepspeed.initialize`."""
    zero = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    if optim.cpu_offload:
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "gradient_clipping": optim.max_grad_norm,
        "bf16": {"enabled": optim.bf16},
        "zero_optimization": zero,
        # torch's AdamW also on offloaded states: DeepSpeedCPUAdam would need a C++ build.
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.learning_rate,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _without_shared_memory_all_reduce():
    """DeepSpeed's CPU backend builds a shared-memory all-reduce (a C++ extension, compiled on first use behind a
    file lock) and, while joining, each rank spins until every peer's segment exists, with no timeout: one
    slow or missing peer hangs the whole group forever. Gloo does every collective of a CPU run, so the
    extension is marked unavailable (DeepSpeed reads this table before it builds) and never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """DeepSpeed ZeRO-3 with torch's AdamW (`torch_adam`: no extension build) and our cosine schedule."""

    def __init__(self, load, env: DistEnv, optim: OptimConfig):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        if env.device.type == "cpu":
            _without_shared_memory_all_reduce()
        self.env, self.optim = env, optim
        self.config = deepspeed_config(optim)
        # While this object lives, transformers builds models under deepspeed.zero.Init: each parameter is
        # partitioned as it is created, and from_pretrained reads the checkpoint on rank 0 only. It must stay
        # referenced (transformers keeps a weak reference) for the reference model and for saving.
        self.hf_deepspeed_config = HfDeepSpeedConfig(self.config)
        self.policy = load()
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.policy,
            model_parameters=trainable_parameters(self.policy),
            config=self.config,
            lr_scheduler=lambda optimizer: cosine_schedule(optimizer, optim),
        )

    def frozen(self, load):
        import deepspeed

        policy = load().requires_grad_(False)
        config = {key: value for key, value in self.config.items() if key != "optimizer"}
        engine, *_ = deepspeed.initialize(model=policy, config=config)
        engine.eval()  # DeepSpeed's eval() returns None, unlike nn.Module's
        return engine

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss, last_micro_batch: bool):
        # DeepSpeed scales the loss by 1/accumulation itself, and counts micro-batches in step().
        self.model.backward(loss)
        if not last_micro_batch:
            self.model.step()

    def step(self) -> float:
        # The accumulation boundary: clip, AdamW, schedule. DeepSpeed itself skips the update and the schedule
        # when the gradient norm is NaN or infinite, and then reports the norm as inf.
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: str):
        # Frozen weights (an adapter run's base) are not saved again: a resumed run loads them as it started.
        self.model.save_checkpoint(directory, tag="deepspeed", exclude_frozen_parameters=True)

    def load(self, directory: str):
        frozen = len(trainable_parameters(self.policy)) < len(list(self.policy.parameters()))
        path, _ = self.model.load_checkpoint(
            directory, tag="deepspeed", load_lr_scheduler_states=True, load_module_strict=not frozen
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (tag 'deepspeed') to resume from")

    def full_state_dict(self) -> dict | None:
        # Gathers every ZeRO-3 partition onto rank 0 (in the training dtype); None on the other ranks.
        state = self.model._zero3_consolidated_16bit_state_dict()
        return {key: value.cpu() for key, value in state.items()} if self.env.is_main else None


ENGINES = {"fsdp2": Fsdp2Engine, "deepspeed": DeepSpeedEngine}
