"""gemma-7b's production path without its weights: its chat template over the whole
general bank, the loader's one-line fixes, and a tiny random-weight GemmaForCausalLM
(gemma-7b's class; tests/tiny_gemma.py) as a `dir:` checkpoint through the reference's
memory budgets, calibration, the audit and the daemon."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from validator.models.checkpoints import (CheckpointUnavailable, Budgets, derive_budgets, load_model,
                                          parse_bytes, render_chat, resolve_device)
from validator.models.registry import ModelSpec, Registry
from validator.models.sampling import Settings
from validator.probing.probes import greedy_and_sampled, load_bank
from validator.scoring.align import AlignItem, Aligner
from validator.scoring.reference import ReferenceModel, held_bytes
from validator.service.scorer import Scorer

from . import tiny_gemma

BANK = "configs/prompts/general.yaml"
# gemma-7b-it's own template (tokenizer_config.json on the hub), which refuses a system turn.
GEMMA_7B_IT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


# -- gemma-7b's chat template --------------------------------------------------------------
def test_gemma_7b_template_renders_every_general_probe(registry):
    template = registry.get("gemma-7b").chat_template
    bank = load_bank(BANK)
    with_system = [p for p in bank if p.messages[0]["role"] == "system"]
    assert len(with_system) == 8  # the probes the original template refuses
    for p in with_system:
        with pytest.raises(Exception, match="System role not supported"):
            render_chat(GEMMA_7B_IT_TEMPLATE, p.messages)
    for p in bank:
        text = render_chat(template, p.messages)
        assert text.startswith("<bos><start_of_turn>user\n") and text.endswith("<start_of_turn>model\n")
        assert "<start_of_turn>system" not in text
        turns = [m for m in p.messages if m["role"] != "system"]
        assert text.count("<start_of_turn>") == len(turns) + 1
        if p.messages[0]["role"] == "system":  # folded into the first user turn, system first
            first = text.split("<end_of_turn>")[0]
            assert first == ("<bos><start_of_turn>user\n" + p.messages[0]["content"] + "\n\n"
                             + p.messages[1]["content"].strip())
        else:  # without a system turn: exactly gemma-7b-it's own rendering
            assert text == render_chat(GEMMA_7B_IT_TEMPLATE, p.messages)


def test_probes_the_template_refuses_are_never_sent(registry, tmp_path):
    """The daemon's bank per claimed model leaves out what the reference's template refuses
    (roles out of turn for gemma-7b), before any probe is derived or sent."""
    from validator.daemon import Daemon
    from validator.service.config import ValidatorConfig

    bank = load_bank(BANK)[:6]
    rows = [{"id": p.id, "kind": p.kind, "messages": p.messages} for p in bank]
    rows.append({"id": "two-users", "kind": "chat",
                 "messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]})
    (tmp_path / "bank.yaml").write_text(yaml.safe_dump({"prompts": rows}))
    cfg = ValidatorConfig.model_validate({
        "database": f"sqlite:///{tmp_path / 'v.db'}", "secret": "s", "prompts": str(tmp_path / "bank.yaml"),
        "hosts": [{"name": "h", "url": "http://127.0.0.1:9/v1", "model": "gemma-7b"}]})
    daemon = Daemon(cfg, models={})
    assert [p.id for p in daemon.bank_for("gemma-7b")] == [p.id for p in bank]
    reasons = daemon.service.scorer.refusals("gemma-7b", [r["messages"] for r in rows])
    assert reasons[:-1] == [None] * len(bank) and "alternate" in reasons[-1]
    assert all(why is None for why in daemon.service.scorer.refusals("smollm2-135m", [r["messages"] for r in rows]))


# -- loading: one line naming the fix ------------------------------------------------------
def test_missing_directory_and_non_checkpoint_name_the_fix(tmp_path):
    spec = ModelSpec("m", {"dir": str(tmp_path / "nowhere")})
    with pytest.raises(CheckpointUnavailable, match="does not exist: set the entry's checkpoint.dir"):
        load_model(spec, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointUnavailable, match="no config.json"):
        load_model(ModelSpec("m", {"dir": str(tmp_path / "empty")}), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_cuda_without_a_cuda_torch_names_the_cuda_build():
    with pytest.raises(CheckpointUnavailable, match="install the CUDA build of torch"):
        resolve_device(ModelSpec("m", {"hub": "a/b"}, device="cuda:1"))


def test_gated_hub_checkpoint_names_the_licence_and_hf_token(monkeypatch):
    """The hub cannot be reached from here: transformers' own error for a gated repository
    (an OSError raised from huggingface_hub's GatedRepoError) stands in for it."""
    from huggingface_hub.errors import GatedRepoError

    import transformers

    import httpx

    url = "https://huggingface.co/google/gemma-7b-it/resolve/main/config.json"
    response = httpx.Response(401, request=httpx.Request("GET", url))

    def gated(*args, **kwargs):
        try:
            raise GatedRepoError("401 Client Error: access to model google/gemma-7b-it is restricted",
                                 response=response)
        except GatedRepoError as exc:
            raise OSError("You are trying to access a gated repo.") from exc

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(CheckpointUnavailable) as info:
        load_model(Registry.load().get("gemma-7b"), device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "https://huggingface.co/google/gemma-7b-it" in message and "HF_TOKEN is not set" in message


def test_calibrate_gemma_7b_offline_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """`validator calibrate --model gemma-7b` where the weights cannot be fetched: exit 2
    and one line saying what to do (the real hub client, offline)."""
    import huggingface_hub.constants
    from typer.testing import CliRunner

    from validator.cli import app

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["calibrate", "--model", "gemma-7b", "--out", str(tmp_path / "g.json")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "not in the local cache" in lines[0] and "checkpoint.dir" in lines[0]
    assert not (tmp_path / "g.json").exists()


def test_budgets_from_models_yaml_and_free_memory():
    class Config:  # gemma-7b's shape
        num_hidden_layers, num_attention_heads, num_key_value_heads = 28, 16, 16
        head_dim, hidden_size, intermediate_size = 256, 3072, 24576

    spec = ModelSpec("gemma-7b", {"hub": "google/gemma-7b-it"}, dtype="bfloat16")
    small = derive_budgets(spec, Config, "cuda:0", 2, 256000, free=6 << 30)
    large = derive_budgets(spec, Config, "cuda:0", 2, 256000, free=120 << 30)
    assert small.batch_tokens < large.batch_tokens <= 65536
    assert small.kept_kv_bytes < large.kept_kv_bytes
    assert small.kept_kv_bytes + small.logit_bytes + small.batch_tokens * 2 * (4 * 3072 + 3 * 4096 + 3 * 24576) \
        <= 0.8 * (6 << 30)
    pinned = ModelSpec("gemma-7b", {"hub": "x/y"}, extra={"budgets": {"batch_tokens": 4096, "kept_kv_bytes": "2GiB"}})
    b = derive_budgets(pinned, Config, "cuda:0", 2, 256000, free=120 << 30)
    assert (b.batch_tokens, b.kept_kv_bytes) == (4096, 2 << 30) and "models.yaml (batch_tokens, kept_kv_bytes)" in b.source
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes(1000) == 1000


# -- the tiny Gemma ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(registry, directory) of the tiny Gemma checkpoint."""
    directory = tmp_path_factory.mktemp("tiny-gemma")
    checkpoint = tiny_gemma.build(directory / "checkpoint")
    return Registry.load(tiny_gemma.registry_file(directory, checkpoint)), directory


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    return ReferenceModel.load(tiny[0].get(tiny_gemma.NAME))


def test_tiny_gemma_is_gemma_7b_class_with_gemma_7b_template(tiny_ref, registry):
    assert type(tiny_ref.model).__name__ == "GemmaForCausalLM"  # gemma-7b's class
    assert tiny_ref.device == "cpu" and tiny_ref.model.dtype == torch.float32
    bank = load_bank(BANK)
    template = registry.get("gemma-7b").chat_template
    for p in bank:  # transformers' own rendering agrees with the pre-send check's
        assert tiny_ref.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True,
                                                      tokenize=False) == render_chat(template, p.messages)
    ids = tiny_ref.prompt_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert tiny_ref.tokenizer.decode(ids) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tiny_ref.tokenizer.convert_tokens_to_ids("<end_of_turn>") in tiny_ref.eos_ids


def test_low_precision_head_gives_float32_log_probs(tiny_ref):
    """A bfloat16 head's own output is rounded to bfloat16 (0.125 apart near 20); the
    reference's logits are float32 products of the same weights."""
    hidden = torch.randn(3, tiny_ref.model.config.hidden_size) * 4
    head = tiny_ref.model.get_output_embeddings()
    with torch.no_grad():
        exact = hidden.double() @ head.weight.double().T
        head.to(torch.bfloat16)
        try:
            ours = tiny_ref.logits(hidden.to(torch.bfloat16))
            theirs = head(hidden.to(torch.bfloat16)).float()
            exact_bf16_inputs = hidden.to(torch.bfloat16).double() @ head.weight.double().T
        finally:
            head.to(torch.float32)
    assert ours.dtype == torch.float32
    assert float((ours.double() - exact_bf16_inputs).abs().max()) < 1e-3
    assert float((theirs.double() - exact_bf16_inputs).abs().max()) > 1e-2
    assert exact.shape == ours.shape


class TensorSizes(TorchDispatchMode):
    """Every tensor an operation makes, by shape: the largest [rows x vocabulary] one."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.vocab_rows, self.largest = vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
                if t.dim() and t.shape[-1] == self.vocab:
                    self.vocab_rows = max(self.vocab_rows, t.numel() // self.vocab)
        return out


def watch_passes(ref: ReferenceModel) -> list[dict]:
    """Per forward pass of the decoder: positions run and the cache it attends over."""
    from validator.scoring.reference import _cache_layers

    seen = []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        cache = kwargs.get(ref._cache_arg)
        held = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in _cache_layers(cache)) if cache is not None else 0
        cached = cache.get_seq_length() if cache is not None else 0
        seen.append({"positions": ids.numel(), "cache_bytes": held,
                     "cache_after": ids.shape[0] * (cached + ids.shape[1]) * ref.kv_per_token})

    handle = ref.model.model.register_forward_pre_hook(hook, with_kwargs=True)
    seen.append(handle)
    return seen


def test_memory_stays_inside_the_configured_budgets(tiny_ref):
    """A 2,000-token prompt's re-run and a 64-answer alignment with small budgets: no pass
    runs more positions than batch_tokens, no cache holds more than kept_kv_bytes, the
    pasts held between passes stay inside kept_kv_bytes, and no [rows x vocabulary]
    tensor has more rows than logit_bytes allows (a whole prompt's logits would have
    2,000 rows; tensor sizes of the real tiny Gemma, measured)."""
    ref = tiny_ref
    budgets = Budgets(batch_tokens=2048, kept_kv_bytes=6 << 20, logit_bytes=16 * 4 * ref.vocab_size,
                      align_chunk=64, source="test")
    saved = ref.budgets
    ref.bind(ref.model, ref.device, budgets)
    passes = watch_passes(ref)
    handle = passes.pop()
    held: list[int] = []
    score_paths = ref.score_paths

    def counted(items, pasts=None, keep_past=False):
        feats, kept = score_paths(items, pasts=pasts, keep_past=keep_past)
        held.append(held_bytes([*(pasts or []), *kept]))
        return feats, kept

    ref.score_paths = counted
    try:
        words = " ".join(f"word{i}" for i in range(1200))
        prompt = ref.prompt_ids([{"role": "user", "content": words}])[:2000]
        assert len(prompt) == 2000
        with TensorSizes(ref.vocab_size) as sizes:
            out = ref.generate([prompt], [Settings(temperature=0.0, max_tokens=4)], [1])
        assert len(out[0]) == 4
        assert sizes.vocab_rows <= budgets.logit_rows(ref.vocab_size) < len(prompt)
        rerun = list(passes)
        assert max(p["positions"] for p in rerun) <= budgets.batch_tokens
        assert max(p["cache_after"] for p in rerun) <= budgets.kept_kv_bytes

        bank = load_bank(BANK)[:8]
        prompts = [ref.prompt_ids(p.messages) for p in bank]
        answers = ["Bí Bí Bí Bí Bí Bí", " inspect inspect inspect", "Paris is the capital of France.",
                   "1, 2, 3, 4", "", "The answer is 42.", "Bí Bí", "novedades"]
        settings = [Settings(temperature=0.0, max_tokens=32), Settings(temperature=0.8, top_p=0.9, max_tokens=32)]
        items = [AlignItem(prompts[i % 8], answers[(i // 8) % 8], settings[i % 2]) for i in range(64)]
        passes.clear()
        with TensorSizes(ref.vocab_size) as sizes:
            alignments = Aligner(ref).align(items)
        assert len(alignments) == 64 and held
        assert sizes.vocab_rows <= budgets.logit_rows(ref.vocab_size)
        assert max(p["positions"] for p in passes) <= budgets.batch_tokens
        assert max(p["cache_after"] for p in passes) <= budgets.kept_kv_bytes
        assert max(held) <= budgets.kept_kv_bytes
        assert len(passes) > 2  # the batch was split to stay inside the budgets
    finally:
        handle.remove()
        del ref.score_paths
        ref.bind(ref.model, ref.device, saved)


# Short answers: the tiny model's work is its 262k-entry head, as gemma-7b's is.
TINY_MIX = [(1.0, Settings(temperature=0.0, top_k=50, top_p=0.5, max_tokens=16)),
            (1.0, Settings(temperature=0.7, top_k=50, top_p=0.9, max_tokens=16))]


def tiny_probes(n: int = 3):
    return greedy_and_sampled(load_bank(BANK)[:n], TINY_MIX, seed=5)


def test_tiny_gemma_calibrates_and_audits(tiny, tiny_ref):
    """`validator calibrate` for a `dir:` checkpoint (transformers engines only: no GGUF),
    then the audit of an honest host with its tolerances: every answer passes. (The
    other model's answers failing: test_tiny_gemma_refereed_by_the_daemon. The tiny
    model's sampling is nearly greedy, so cheats on settings are not told apart with it.)"""
    from validator.network.catalogue import CATALOGUE, OfflineNetwork
    from validator.service.audit import run_audit
    from validator.service.calibration import calibrate, default_engines

    registry, directory = tiny
    spec = registry.get(tiny_gemma.NAME)
    assert default_engines(spec) == ["transformers-float32", "transformers-bfloat16", "transformers-float32-eager",
                                     "transformers-float32-batch8", "transformers-float32-batch1"]
    with pytest.raises(ValueError, match="llama.cpp runs a GGUF file"):
        calibrate(spec, BANK, ["llama.cpp"])
    bank = directory / "calibration-bank.yaml"
    bank.write_text(yaml.safe_dump({"prompts": [{"id": p.id, "kind": p.kind, "messages": p.messages}
                                                for p in load_bank("configs/prompts/calibration.yaml")[:2]]}))
    result = calibrate(spec, bank, ["transformers-float32"], log=lambda m: None)
    assert result["engines"]["transformers-float32"]["greedy_tokens"] > 0
    spec.calibration.parent.mkdir(parents=True, exist_ok=True)
    spec.calibration.write_text(json.dumps(result))

    hosts = {"honest": CATALOGUE["honest-transformers-fp32"]}
    network = OfflineNetwork.of(hosts, tiny_gemma.NAME, registry)
    records = [r for host in hosts for r in network.records(host, tiny_probes())]
    lines, summary = run_audit((json.dumps(r) for r in records), Scorer(registry, models={tiny_gemma.NAME: tiny_ref}))
    assert result["tolerances"]["greedy_gap"] == 0.5  # honest float32 answers: no gap, the floor
    assert all(line["metrics"]["tolerances"].startswith(f"{tiny_gemma.NAME}.json") for line in lines)
    assert summary["honest"]["failed"] == 0 and summary["honest"]["verdict"] != "dishonest"
    assert [line["verdict"] for line in lines] == ["pass"] * len(records)


def test_tiny_gemma_refereed_by_the_daemon(tiny, tiny_ref, tmp_path):
    """Simulated hosts on loopback claiming the tiny Gemma, refereed by the real daemon
    (probes rendered with gemma-7b's template before they are sent, answers scored with
    the `dir:` reference, re-runs included): the honest host's answers all pass, the
    other model's fail."""
    from validator.daemon import Daemon
    from validator.network.simulator import NetworkConfig, SimulatedNetwork
    from validator.service.config import ValidatorConfig
    from validator.store import Store

    registry, _ = tiny
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump({"mixes": {"tiny": [
        {"weight": 1, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "max_tokens": s.max_tokens}
        for _, s in TINY_MIX]}}))
    net = SimulatedNetwork(NetworkConfig(model=tiny_gemma.NAME, models=str(registry.path), hosts=[
        {"name": "honest", "strategy": "honest-transformers"}, {"name": "cheat", "strategy": "other-model"}]))
    net.load()
    net.start()
    try:
        cfg = ValidatorConfig.model_validate({
            "database": f"sqlite:///{tmp_path / 'v.db'}", "secret": "tiny", "models": str(registry.path),
            "settings_file": str(tmp_path / "settings.yaml"), "settings_mix": "tiny",
            "rounds": {"interval_s": 1e9, "spread_s": 0, "jitter_s": 0, "probes_per_host": 3},
            "scoring": {"interval_s": 1, "batch": 16},
            # generous: the hosts' engines share this machine's CPU with the scorer
            "client": {"connect_s": 10, "first_byte_s": 300, "total_s": 400, "retries": 0},
            "hosts": [{"name": n, "url": net.urls[n], "model": tiny_gemma.NAME} for n in ("honest", "cheat")]})
        daemon = Daemon(cfg, models={tiny_gemma.NAME: tiny_ref})
        progress = asyncio.run(daemon.run(max_rounds=1, first_round=1))
    finally:
        net.stop()
    assert progress.sent == 6 and progress.answered == 6 and progress.scored == 6
    store = Store(cfg.database_url)
    from validator.service.reads import host_rows

    rows = {r["host"]: r for r in host_rows(store)}
    assert rows["honest"]["errors"] == 0 and rows["honest"]["scored"] == 3
    assert rows["cheat"]["scored"] == 3
    from sqlalchemy import text

    with store.engine.connect() as c:
        verdicts = c.execute(text("select hosts.name, scores.verdict from scores join probes on probes.id = scores.probe_id "
                                  "join hosts on hosts.id = probes.host_id")).fetchall()
    assert sorted(v for h, v in verdicts if h == "honest") == ["pass"] * 3
    assert sorted(v for h, v in verdicts if h == "cheat") == ["fail"] * 3


# -- calibration engines ---------------------------------------------------------------------
def test_calibration_engine_names(registry, tiny):
    """transformers-DTYPE[-eager][-batchN] and llama.cpp, each an honest simulator host;
    `all` is every dtype, eager attention and batches of 1, 8 and 32; llama.cpp only
    where a GGUF exists."""
    from validator.network.simulator import NetworkConfig, Network
    from validator.service.calibration import engine_names, honest_hosts

    gguf, directory = registry.get("gemma-3-270m"), tiny[0].get(tiny_gemma.NAME)
    everything = engine_names(gguf, "all")
    assert everything[-1] == "llama.cpp" and engine_names(directory, "all") == everything[:-1]
    assert {"transformers-float16", "transformers-float32-eager", "transformers-bfloat16-eager",
            "transformers-float32-batch1", "transformers-float32-batch8", "transformers-bfloat16-batch1"} <= set(everything)
    assert engine_names(gguf, " transformers-float16 ,llama.cpp") == ["transformers-float16", "llama.cpp"]
    hosts = {h: c for name in everything for h, c in honest_hosts(name).items()}
    network = Network(NetworkConfig(model="gemma-3-270m", hosts=[{"name": h, **c} for h, c in hosts.items()]))
    keys = {h: s.engines[0] for h, s in network.hosts.items() if s.name == "honest-transformers"}
    assert keys["transformers-float32"] == "fp32" and keys["transformers-bfloat16-batch8"] == "bf16-batch8"
    assert keys["transformers-float32-eager"] == "fp32-eager" and keys["transformers-float16"] == "fp16"


def test_batched_engines_answer_each_request_under_its_own_settings(tiny):
    """Batches of 1 and 8 with left padding, SDPA or eager attention, on the reference's
    device: an engine answering one request at a time answers it the same whatever it
    answered before (a request's stream is seeded from the request, not the batch's
    first seed: probes carry no seed, and every one replaying stream 0 would correlate
    the draws), and a batch mixes prompts, each answered under its own settings."""
    from validator.network.engines import Request, load_engine

    registry, _ = tiny
    prompts = [p.messages for p in load_bank(BANK)[:8]]
    sampled, greedy = Settings(temperature=1.0, top_k=0, top_p=1.0, max_tokens=6), Settings(temperature=0.0, max_tokens=6)
    one = load_engine(registry, tiny_gemma.NAME, "fp32-batch1")
    eight = load_engine(registry, tiny_gemma.NAME, "fp32-eager-batch8")
    assert (one.name, one.batch_size, one.device) == ("transformers-float32-batch1", 1, "cpu")
    assert (eight.name, eight.model.config._attn_implementation) == ("transformers-float32-eager-batch8", "eager")
    requests = [Request(m, sampled if i % 2 else greedy) for i, m in enumerate(prompts)]
    together = one.generate(requests)
    alone = [one.generate([r])[0] for r in reversed(requests)][::-1]
    assert together == alone
    assert len({t for t, r in zip(together, requests) if not r.settings.greedy}) > 1  # not one stream replayed
    batched = eight.generate(requests)
    assert batched == eight.generate(requests)  # the same batch: the same answers
    assert [t for t, r in zip(batched, requests) if r.settings.greedy] == [t for t, r in zip(together, requests)
                                                                           if r.settings.greedy]


def test_calibrate_reuses_saved_answers_and_leaves_out_an_engine_that_answers_nothing(tiny, tmp_path):
    """Saved answers are used engine by engine (an engine asked for that they lack is
    answered and added); an engine whose every answer is empty (float16 overflowing on a
    model trained in bfloat16: gemma-3-270m's greedy answers in float16 are all empty and
    its sampled ones raise) is left out, and the result says so."""
    from validator.network.catalogue import OfflineNetwork
    from validator.service.calibration import calibrate, honest_hosts

    registry, directory = tiny
    spec = registry.get(tiny_gemma.NAME)
    bank = tmp_path / "bank.yaml"
    bank.write_text(yaml.safe_dump({"prompts": [{"id": p.id, "kind": p.kind, "messages": p.messages}
                                                for p in load_bank("configs/prompts/calibration.yaml")[:1]]}))
    network = OfflineNetwork.of(honest_hosts("transformers-float32"), tiny_gemma.NAME, registry)
    probes = greedy_and_sampled(load_bank(bank), TINY_MIX, seed=1)
    honest = network.records("transformers-float32", probes)
    empty = [{**r, "host": "transformers-float16", "response": ""} for r in honest]
    answers = tmp_path / "t.answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in honest + empty))
    logged: list[str] = []
    result = calibrate(spec, bank, ["transformers-float32", "transformers-float32-batch1"], answers=answers,
                       log=logged.append)
    assert list(result["engines"]) == ["transformers-float32", "transformers-float32-batch1"]
    assert result["left_out"] == {"transformers-float16": "all 2 answers are empty"}
    assert "--engines transformers-float32,transformers-float32-batch1,transformers-float16" in result["command"]
    assert [m.split(" with ")[-1] for m in logged if m.startswith("answering")] == ["transformers-float32-batch1 ..."]
    saved = [json.loads(line)["host"] for line in answers.read_text().splitlines()]
    assert saved.count("transformers-float32-batch1") == len(honest)
