"""What the distributed training engines change about reading and saving router parameters.

DDP keeps a whole fp32 replica on every rank. The others do not:

* DeepSpeed ZeRO-3 partitions every parameter: outside a forward a rank holds a slice (often empty), so a value read
  directly — the monitor's static α entropy — must be gathered (`deepspeed.zero.GatheredParameters`, a collective);
* FSDP2 (`fully_shard`) and tensor parallelism hold DTensors: `full_tensor()` assembles them (also a collective);
* DeepSpeed with bf16 casts the whole module, routers included, to bf16 and keeps the fp32 masters in its optimizer,
  so the state dict it hands to `save_pretrained` has bf16 routers although the model promises fp32 ones. The fp32
  masters come from `deepspeed.utils.safe_get_full_fp32_param` (a collective under ZeRO-1/2/3).

Every function here that may run a collective must be called on every rank in the same order.
"""

from typing import Optional

import torch

from .routing_stats import unwrap_polyglu_model


def is_router_parameter(name: str) -> bool:
    return ".router." in name or name.startswith("router.")


def full_parameter(parameter: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter as a plain detached tensor, whichever engine holds it (collective if sharded)."""
    if hasattr(parameter, "ds_id"):  # DeepSpeed ZeRO-3 partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            return parameter.detach().clone()
    if hasattr(parameter, "full_tensor"):  # DTensor: FSDP2 or tensor parallel
        return parameter.full_tensor().detach()
    return parameter.detach()


def copy_parameter(target: torch.nn.Parameter, source: torch.Tensor) -> None:
    """target ← source, whole values; under ZeRO-3 both are gathered and rank 0's copy is partitioned back
    (a collective: call on every rank)."""
    partitioned = [tensor for tensor in (target, source) if hasattr(tensor, "ds_id")]
    if not partitioned:
        target.data.copy_(source.data)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        if deepspeed.comm.get_rank() == 0:
            target.data.copy_(source.data)


def whole_shape(parameter: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter (ZeRO-3 keeps it as ds_shape beside an empty local tensor)."""
    return getattr(parameter, "ds_shape", parameter.shape)


def _fp32_master(parameter: torch.Tensor, deepspeed_enabled: bool) -> torch.Tensor:
    if deepspeed_enabled and parameter.requires_grad:
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(parameter)
        if master is not None:
            return master.detach().float().cpu()
    return full_parameter(parameter).float().cpu()


def router_fp32_masters(model) -> dict:
    """{name: fp32 value} of every router parameter, DeepSpeed's fp32 master where there is one (a collective under
    ZeRO-1/2/3: call on every rank)."""
    base = unwrap_polyglu_model(model)
    return {name: _fp32_master(parameter, True) for name, parameter in base.named_parameters() if is_router_parameter(name)}


def router_state_in_fp32(model, state_dict: dict, deepspeed_enabled: bool, masters: Optional[dict] = None) -> dict:
    """`state_dict` with every router entry replaced by its fp32 value: DeepSpeed's fp32 master where there is one.

    Under DeepSpeed, `masters` are router_fp32_masters(model), gathered beforehand on every rank; without them they
    are gathered here, so call on every rank. `state_dict` is None or empty on ranks that do not save (ZeRO-3
    consolidates it on rank 0 only). Elsewhere routers are fp32 parameters and a non-fp32 entry is cast.
    """
    if not deepspeed_enabled:
        if state_dict is None:
            return None
        return {
            name: value.float() if is_router_parameter(name) and value.is_floating_point() else value
            for name, value in state_dict.items()
        }
    masters = router_fp32_masters(model) if masters is None else masters
    if state_dict is None:
        return None
    return {name: masters.get(name, value) for name, value in state_dict.items()}


def without_tied_copies(model, state_dict: Optional[dict]) -> Optional[dict]:
    """`state_dict` without the tied weights' copies (lm_head.weight of a tied model).

    ZeRO-2 and FSDP2 hand over a state dict of separate tensors, so save_pretrained cannot see the tie by storage and
    writes the embedding twice; DDP's checkpoint holds it once, and so should theirs.
    """
    base = unwrap_polyglu_model(model)
    if not state_dict or not getattr(base.config, "tie_word_embeddings", False):
        return state_dict
    tied = getattr(base, "_tied_weights_keys", None) or {}
    copies = [target for target, source in tied.items() if target in state_dict and source in state_dict]
    return {name: value for name, value in state_dict.items() if name not in copies}


class RoutersSavedInFp32Mixin:
    """For any Trainer subclass: saved checkpoints hold the routers in fp32 (DeepSpeed's masters under bf16), and tied
    weights once, whichever engine gathered the state dict."""

    def save_model(self, output_dir=None, _internal_call=False):
        # every rank gathers DeepSpeed's masters here, before the Trainer's own save: transformers < 5.23 calls _save
        # under DeepSpeed on the saving rank alone, where a gather inside it waits for the others forever
        self._router_masters = router_fp32_masters(self.model) if self.is_deepspeed_enabled else None
        try:
            return super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._router_masters = None

    def _save(self, output_dir=None, state_dict=None):
        # without DeepSpeed and without a state dict the model's own (fp32) routers are saved
        masters = getattr(self, "_router_masters", None)
        state_dict = router_state_in_fp32(self.model, state_dict, self.is_deepspeed_enabled, masters)
        return super()._save(output_dir, state_dict=without_tied_copies(self.model, state_dict))


# How long the main thread leaves the GIL to gloo's worker threads before the interpreter finalizes (see below)
GLOO_WORKERS_SETTLE_SECONDS = 0.25


def close_process_group() -> None:
    """Tear torch.distributed down before the interpreter exits, so that no gloo worker thread needs Python after.

    Two ways a rank aborted at exit after training and saving had finished ("terminate called without an active
    exception", SIGABRT, the launcher exits 1):
    - A group left to interpreter shutdown: its threads are still joinable when static destructors run (seen in about
      1 of 10 two-rank runs, and in a 6-line gloo script). destroy_process_group joins the threads of every group
      nothing else references.
    - Groups that DeepSpeed or accelerate still reference survive destroy_process_group with their worker threads.
      A worker that drops the last reference to a finished collective whose tensors Python already freed must take
      the GIL to free them. Python 3.11 exits a thread that takes the GIL during finalization, and the forced unwind
      through gloo's destructor calls std::terminate (seen in a core dump: ProcessGroupGloo::runLoop destroying an
      AsyncBarrierWork -> AsyncAllgatherWork while the main thread was in Py_FinalizeEx; 3 of 40 ZeRO-3 runs on
      a loaded 2-core machine). The barrier here is such a collective, so the main thread then sleeps, leaving the
      GIL to the workers. They need it for microseconds, so the sleep makes this unlikely rather than impossible.
    Launchers that own the group (Ray Train) only destroy it if it is still initialised, so closing it here is safe.
    """
    import time

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(GLOO_WORKERS_SETTLE_SECONDS)
