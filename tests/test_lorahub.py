"""LoraHub's composition (A = sum w_i A_i, B = sum w_i B_i) and the loss its search minimises."""

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from hydrabench.config.spec import AdapterSettings
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.lora import lora_config
from hydrabench.methods.lora_split import COMBINED
from hydrabench.methods.lorahub import compose
from hydrabench.models import load_base_model
from hydrabench.training.loop import collate, encode_record, mean_loss


def test_compose_is_the_weighted_sum_of_a_and_b() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    config = lora_config(AdapterSettings(rank=2))
    model = get_peft_model(model, config, adapter_name="up_0")
    for name in ("up_1", COMBINED):
        model.add_adapter(name, config)
    with torch.no_grad():  # every adapter's A and B non-zero and different (B starts at 0)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()
    compose(model, [get_peft_model_state_dict(model, adapter_name=n) for n in ("up_0", "up_1")],
            [0.5, -1.5])
    states = {n: get_peft_model_state_dict(model, adapter_name=n)
              for n in ("up_0", "up_1", COMBINED)}
    assert states[COMBINED].keys() == states["up_0"].keys()
    for key, value in states[COMBINED].items():
        torch.testing.assert_close(value, 0.5 * states["up_0"][key] - 1.5 * states["up_1"][key])


def test_mean_loss_is_the_token_mean_training_loss() -> None:
    base = load_base_model("builtin:tiny")
    records = [InstructionRecord(instruction="Q: 2 + 2\nA:", output=" 4"),
               InstructionRecord(instruction="Q: name a colour\nA:", output=" red and blue")]
    encoded = [encode_record(base.tokenizer, r, "plain", 64) for r in records]
    batch = collate(encoded, base.tokenizer.pad_token_id)
    with torch.no_grad():  # one batch of both: the model's own token-mean loss
        expected = base.model(**batch).loss.item()
    got = mean_loss(base.model, base.tokenizer, records, template="plain", seq_len=64)
    assert got == pytest.approx(expected, rel=1e-5)
    split = mean_loss(base.model, base.tokenizer, records, template="plain", seq_len=64,
                      batch_size=1)  # per-record batches, weighted by their tokens
    assert split == pytest.approx(expected, rel=1e-5)
