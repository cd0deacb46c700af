"""The word-level tokenizer of the embedded default model.

Every integer from 0 to ``MAX_NUMBER`` is one token (like GPT-2's `` 57``), so every answer
the problem generators produce is a single token. Words and punctuation are split on
whitespace and punctuation; anything else maps to ``<unk>``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

MAX_NUMBER = 1999
BOS = "<|endoftext|>"
UNK = "<unk>"

# Words of every prompt format so2lib writes, plus common math/logic words so that natural
# prompts and the concept lexicon tokenize without falling back to <unk>.
WORDS = """
+ - * / = ( ) , ; : ? . ! ' " x y n
Q A What what is Is Which which larger smaller of or and not if then true false
Solve solve for the The answer Answer max min equals plus minus times divided by
yes no number numbers sum difference product quotient greater less than equal
carry borrow digit digits odd even prime zero one two three four five six seven eight nine ten
add subtract multiply divide compare statement value variable unknown step total result
all some none every each more fewer many much half twice double
""".split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the embedded model's tokenizer (deterministic: same vocab every call).

    Returns a ``PreTrainedTokenizerFast`` whose id 0 is ``<|endoftext|>`` (BOS, EOS and pad),
    id 1 ``<unk>``, ids 2..2001 the numbers ``"0".."1999"``, then ``WORDS``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {BOS: 0, UNK: 1}
    for i in range(MAX_NUMBER + 1):
        vocab[str(i)] = len(vocab)
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        unk_token=UNK,
        model_max_length=64,
    )
