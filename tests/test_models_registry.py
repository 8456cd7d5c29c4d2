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
