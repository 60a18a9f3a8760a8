"""LoRA adapters on a loaded pipeline: every declared adapter loaded once, one set active per batch.

Loading goes through diffusers' own `load_lora_weights(file, adapter_name=name)` (PEFT layers
injected into the transformer, community key formats converted), and switching through
`set_adapters(names, scales)` / `disable_lora()`, exactly what a user of `ZImagePipeline` calls,
so pixels match the reference pipeline. A switch only changes which adapters the PEFT layers
apply and at what scale: no weights move; diffusers walks the transformer's modules, a few ms
(benchmarks/lora.py). Adapters stay unfused: a fused set would round differently from the
reference pipeline and tie a worker to one set.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from zimage_batch.inputs.lora_spec import AdapterSet, format_lora

log = logging.getLogger(__name__)


class LoraAdapters:
    """The adapters loaded into one pipeline, and which set is active."""

    def __init__(self, pipe: Any, files: dict[str, str]) -> None:
        """Load each adapter file (name -> local .safetensors path) under its name."""
        self.pipe = pipe
        self.names = tuple(sorted(files))
        with warnings.catch_warnings():  # PEFT warns that a second adapter makes several: the point here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            for name in self.names:
                pipe.load_lora_weights(files[name], adapter_name=name)
        self.active: AdapterSet | None = None  # unknown until the first switch
        self.switches = 0
        self.use(())

    def use(self, adapters: AdapterSet) -> None:
        """Make `adapters` (canonical (name, scale) pairs; empty: none) the active set."""
        if adapters == self.active:
            return
        missing = [name for name, _ in adapters if name not in self.names]
        if missing:
            raise ValueError(f"adapter(s) {', '.join(missing)} not loaded on this worker (loaded: {', '.join(self.names)})")
        if adapters:
            if not self.active:  # coming from `none` (or the start): the layers were disabled
                self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in adapters], [float(scale) for _, scale in adapters])
        else:
            self.pipe.disable_lora()
        log.debug("adapters: %s", format_lora(adapters) or "none")
        self.active = adapters
        self.switches += 1


def use_adapters(adapters: LoraAdapters | None, lora: AdapterSet) -> None:
    """Make `lora` the active set of `adapters` (an engine without adapters runs only `none`)."""
    if adapters is not None:
        adapters.use(lora)
    elif lora:
        raise ValueError(f"no LoRA adapters are loaded; requested {format_lora(lora)}")
