"""Model loading: what `alignment.models.registry` does to a model beyond transformers' own loading."""

import torch

from alignment.models.registry import keep_four_bit_weights_unpacked, load_model


def _eval_forward_without_gradients(model) -> None:
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        model.get_decoder()(input_ids=ids) if hasattr(model, "get_decoder") else model(input_ids=ids)


def test_four_bit_weights_stay_unpacked_through_an_eval_forward():
    """Under ZeRO-3 each 4-bit weight's data is a DeepSpeed partition: bitsandbytes' CPU repacking
    (on an eval forward without gradients, where the CPU has AVX512-BF16) would overwrite it with
    another layout. With repacking off, the stored bytes are untouched by such a forward."""
    import bitsandbytes as bnb

    model = load_model("tiny-llava", quantization="4bit")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [layer.weight.data.clone() for layer in layers]
    assert keep_four_bit_weights_unpacked(model) == len(layers) > 0
    _eval_forward_without_gradients(model)
    for layer, data in zip(layers, before, strict=True):
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(layer.weight.data, data)


def test_a_chat_template_file_replaces_the_checkpoints(tmp_path):
    """`load_processor(chat_template=FILE)` (recipe key `model.chat_template`): the file's template, as
    `.jinja` or as a checkpoint's `chat_template.json`, becomes the processor's and the tokenizer's, and
    prompt formats read before are read again; a missing file is refused by the recipe's check."""
    import json

    import pytest

    from alignment.config import ConfigError, ModelConfig
    from alignment.data.prompts import prompt_format
    from alignment.models import generic
    from alignment.models.registry import apply_chat_template_file, load_processor

    jinja = tmp_path / "idefics3.jinja"
    jinja.write_text(generic.IDEFICS3_TEMPLATE)
    processor = load_processor("tiny-idefics3", chat_template=str(jinja))
    assert processor.chat_template == processor.tokenizer.chat_template == generic.IDEFICS3_TEMPLATE
    assert prompt_format(processor).answer_prefix == " "  # the tiny build's own template glues the answer
    stock = load_processor("tiny-idefics3")
    assert prompt_format(stock).answer_prefix == ""
    packed = tmp_path / "chat_template.json"
    packed.write_text(json.dumps({"chat_template": generic.IDEFICS3_TEMPLATE}))
    apply_chat_template_file(stock, str(packed))
    assert stock.tokenizer.chat_template == generic.IDEFICS3_TEMPLATE and prompt_format(stock).answer_prefix == " "
    assert ModelConfig(chat_template=str(jinja)).chat_template == str(jinja)
    with pytest.raises(ConfigError, match="model.chat_template: no such file: .*missing.jinja"):
        ModelConfig(chat_template=str(tmp_path / "missing.jinja"))
