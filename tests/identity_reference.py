"""The reference a pruned model must match: the original model with its skipped layers made identity."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def skipped_layers_as_identity(model, skipped):
    """Within the block, each skipped decoder layer returns its input hidden states unchanged."""
    from ulsexport.models import decoder_layers

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skipped]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
