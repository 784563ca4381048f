"""Measure PEFT prefix-tuning of BART with and without the integration (docs/peft.md's numbers).

    OMP_NUM_THREADS=1 python tools/peft_before_after.py     # needs peft; ~1 minute on CPU

Tiny random BART models (tests/reference.py, no download). "stock PEFT" is the
same process with ``bpp.apply(peft=False)``: the core patch stays applied,
which leaves every call without a bart_prefix_patch prefix exactly upstream.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.simplefilter("ignore")
torch.set_num_threads(1)

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from reference import reference_logits, tiny_model  # noqa: E402

import bart_prefix_patch as bpp  # noqa: E402

P = 4
EOS = 2
CONFIGS = {
    "same shape (enc 2x4 heads, dec 2x4)": dict(decoder_layers=2, decoder_attention_heads=4),
    "deeper encoder (enc 4 layers, dec 2)": dict(encoder_layers=4, decoder_layers=2, decoder_attention_heads=4),
    "deeper decoder (enc 2 layers, dec 3)": dict(decoder_layers=3, decoder_attention_heads=4),
    "tiny (enc 2x4 heads, dec 3x2)": {},
}
SOURCE = torch.randint(3, 64, (8, 7), generator=torch.Generator().manual_seed(1))
TARGET = torch.randint(3, 64, (8, 6), generator=torch.Generator().manual_seed(2))
TARGET[:, 0] = EOS


def make(overrides: dict) -> PeftModel:
    model = get_peft_model(tiny_model(seed=0, **overrides), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    generator = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def shifted_positions(model):
    """A copy whose decoder position table starts at P (stock PEFT's positions)."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        table = shifted.model.decoder.embed_positions.weight
        table[2:-P] = table[2 + P:].clone()
    return shifted


def measure(model: PeftModel) -> dict:
    base = model.get_base_model()
    result = {}
    try:
        out = model.generate(
            input_ids=SOURCE, max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        with torch.no_grad():
            plain = base.generate(input_ids=SOURCE, max_new_tokens=10, do_sample=False)
            forced = model(input_ids=SOURCE, decoder_input_ids=out.sequences[:, :-1]).logits
        generated = out.sequences[:, 1:]
        eos = (generated == EOS).long()
        valid = (torch.cumsum(eos, 1) - eos) == 0  # up to and including the first EOS
        same = out.sequences.shape == plain.shape and bool((out.sequences == plain).all())
        result["generate() == generate() without the adapter"] = "yes (prefix ignored)" if same else "no"
        result["max |generate() scores - forward logits|"] = f"{(torch.stack(out.scores, 1) - forced).abs().max().item():.2g}"
        agree = ((forced.argmax(-1) == generated) & valid).sum().item() / valid.sum().item()
        result["greedy tokens == forward argmax"] = f"{agree:.0%}"
        uncached = model.generate(input_ids=SOURCE, max_new_tokens=10, do_sample=False, use_cache=False)
        rows = int((uncached == out.sequences).all(1).sum()) if uncached.shape == out.sequences.shape else 0
        result["cache == no cache (rows of 8)"] = str(rows)
    except Exception as error:  # stock PEFT crashes on some shapes
        result["generate()"] = f"crash ({type(error).__name__})"
    try:
        with torch.no_grad():
            logits = model(input_ids=SOURCE, decoder_input_ids=TARGET).logits
            crossless = copy.deepcopy(model)  # zero the rows of the cross half (docs/peft.md's mapping)
            config = crossless.active_peft_config
            rows = crossless.prompt_encoder["default"].embedding.weight.view(P, 2 * config.num_layers, -1)
            for entry in range(config.num_layers):
                for j in (2, 3):
                    rows[:, (4 * entry + j) % (2 * config.num_layers)] = 0
            without_cross = crossless(input_ids=SOURCE, decoder_input_ids=TARGET).logits
        result["max |logit change| from the cross half"] = f"{(logits - without_cross).abs().max().item():.2g}"
        full = reference_logits(base, SOURCE, TARGET, prefix=bpp.peft_prefix(model, "full"))
        legacy = reference_logits(shifted_positions(base), SOURCE, TARGET, prefix=bpp.peft_prefix(model, "legacy"))
        result["forward vs reference: self+cross prefix, positions 0.."] = f"{(logits.double() - full).abs().max().item():.2g}"
        result["forward vs reference: self prefix only, positions P.."] = f"{(logits.double() - legacy).abs().max().item():.2g}"
    except Exception as error:
        result["forward"] = f"crash ({type(error).__name__})"
    return result


def train(integration: bool) -> str:
    bpp.apply(peft=integration)
    base = tiny_model(seed=0, decoder_layers=2, decoder_attention_heads=4)
    torch.manual_seed(0)
    model = get_peft_model(
        base, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=32)
    )
    generator = torch.Generator().manual_seed(5)
    source = torch.randint(3, 64, (4, 6), generator=generator)
    labels = torch.randint(3, 64, (4, 5), generator=generator)
    labels[:, -1] = EOS
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(80):
        loss = model(input_ids=source, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    out = model.generate(input_ids=source, max_new_tokens=5, do_sample=False)[:, 1:6]
    exact = int((out == labels[:, : out.shape[1]]).all(1).sum()) if out.shape[1] == 5 else 0
    tokens = (out == labels[:, : out.shape[1]]).float().mean().item()
    line = f"loss {losses[0]:.2f} -> {losses[-1]:.2f}; generate() exact match {exact}/4, tokens {tokens:.0%}"
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = PeftModel.from_pretrained(tiny_model(seed=0, decoder_layers=2, decoder_attention_heads=4), directory).eval()
        with torch.no_grad():
            same = torch.equal(loaded(input_ids=source, labels=labels).logits, model(input_ids=source, labels=labels).logits)
        line += f"; save/load logits identical: {same}"
    bpp.apply(peft=True)
    return line


def legacy() -> str:
    """A stock-trained adapter loaded with the integration: forward as stock PEFT's, generate() consistent."""
    overrides = CONFIGS["same shape (enc 2x4 heads, dec 2x4)"]
    model = make(overrides)
    with tempfile.TemporaryDirectory() as directory:
        bpp.apply(peft=False)
        model.save_pretrained(directory)
        with torch.no_grad():
            stock = model(input_ids=SOURCE, decoder_input_ids=TARGET).logits
        bpp.apply(peft=True)
        loaded = PeftModel.from_pretrained(tiny_model(seed=0, **overrides), directory).eval()
    with torch.no_grad():
        ours = loaded(input_ids=SOURCE, decoder_input_ids=TARGET).logits
    out = loaded.generate(input_ids=SOURCE, max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        forced = loaded(input_ids=SOURCE, decoder_input_ids=out.sequences[:, :-1]).logits
    return (
        f"semantics {bpp.peft_semantics(loaded)!r}; max |forward - stock PEFT forward| {(ours - stock).abs().max().item():.2g}; "
        f"max |generate() scores - forward logits| {(torch.stack(out.scores, 1) - forced).abs().max().item():.2g}"
    )


def main() -> None:
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")
    for name, overrides in CONFIGS.items():
        print(f"\n{name}")
        model = make(overrides)
        bpp.apply(peft=False)
        stock = measure(model)
        bpp.apply(peft=True)
        ours = measure(model)
        for key in dict.fromkeys([*stock, *ours]):
            print(f"  {key}: stock {stock.get(key, '-')} | with bart_prefix_patch {ours.get(key, '-')}")
    print("\ntraining (80 Adam steps, 4 random pairs, prefix_projection=True)")
    print(f"  stock PEFT: {train(False)}")
    print(f"  with bart_prefix_patch: {train(True)}")
    print(f"\nlegacy checkpoint (saved by stock PEFT, loaded with the integration): {legacy()}")


if __name__ == "__main__":
    main()
