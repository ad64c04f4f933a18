from __future__ import annotations

import pytest
import torch

from validator.models.sampling import Settings, SettingsError, kept_prefix_sizes, order_scales, sample_next


def test_settings_accept_max_new_tokens_and_defaults():
    s = Settings.from_configs({"max_new_tokens": 33, "temperature": 0})
    assert s.max_tokens == 33 and s.greedy and s.top_k == 50 and s.top_p == 0.5
    assert Settings.from_configs(None) == Settings()
    assert Settings.from_configs({"max_tokens": 10, "max_new_tokens": 99}).max_tokens == 10


@pytest.mark.parametrize("configs, message", [
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": 1.5}, "outside"),
    ({"max_tokens": 5000}, "outside"),
    ({"top_k": 2.5}, "integer"),
    ({"temperature": True}, "number"),
    ({"seed": "x"}, "seed"),
])
def test_settings_reject_bad_values(configs, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_configs(configs)


def test_kept_prefix_sizes_match_a_direct_computation():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 300) * 3, dim=-1)
    s = Settings(temperature=0.6, top_k=0, top_p=0.8)
    top = torch.sort(logp, descending=True).values
    norm = torch.stack([torch.logsumexp(logp * sc, -1) for sc in order_scales(s)], -1)
    sizes = kept_prefix_sizes(top, norm, s)
    for row in range(6):
        for o, scale in enumerate(order_scales(s)):
            probs = torch.softmax(top[row] * scale, -1).tolist()
            kept, mass = 0, 0.0
            for p in probs:  # keep tokens while the mass before them is below top_p
                if mass >= s.top_p:
                    break
                kept, mass = kept + 1, mass + p
            assert sizes[row, o] == kept
    # temperature below 1 sharpens first: transformers' order keeps no more tokens
    assert (sizes[:, 0] <= sizes[:, 1]).all()


def test_sample_next_is_reproducible_per_seed():
    logits = torch.randn(1000)
    s = Settings(temperature=1.0, top_k=0, top_p=1.0)
    a = [sample_next(logits, s, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1
    assert sample_next(logits, Settings(temperature=0.0), None) == int(torch.argmax(logits))
