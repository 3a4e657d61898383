"""Generation settings: where a template's reply stops, and greedy decoding by default."""

from __future__ import annotations

import logging

from vltrain.data.templates import get_template
from vltrain.model.tokenizer import single_token_id

log = logging.getLogger(__name__)


def stop_token_id(tokenizer, template_name: str, warn: bool = False) -> int:
    """The id generation stops at: the template's final stop token (`<|im_end|>`, `<|end|>`, harmony's
    `<|return|>`), or the tokenizer's EOS token where it is not one token of this tokenizer (logged when `warn`)."""
    stop = get_template(template_name).reply_stop_token
    stop_id = single_token_id(tokenizer, stop)
    if stop_id is not None:
        return stop_id
    if warn:
        log.warning("the tokenizer has no single token %s (template %s): generation stops at its EOS token %s "
                    "instead", stop, template_name, tokenizer.eos_token)
    return tokenizer.eos_token_id


def configure_generation(model, tokenizer, template_name: str) -> None:
    """Greedy decoding that stops at `stop_token_id`."""
    stop_id = stop_token_id(tokenizer, template_name, warn=True)
    gen = model.generation_config
    gen.eos_token_id = stop_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
