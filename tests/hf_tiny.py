"""A tiny BERT for sequence classification and its word-level tokenizer, built offline in a folder (tests only),
and a 3-class text task it learns in a few dozen steps: each text is 6 words from one class's word group."""
import random
from pathlib import Path

GROUPS = ["red green blue cyan".split(), "apple pear plum fig".split(), "cat dog cow pig".split()]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def texts(n_train: int = 240, n_test: int = 60, seed: int = 0):
    """((train_texts, train_labels), (test_texts, test_labels)): the shape a recipe's text data function returns."""
    rng = random.Random(seed)

    def make(n):
        ys = [i % len(GROUPS) for i in range(n)]
        return [" ".join(rng.choice(GROUPS[y]) for _ in range(6)) for y in ys], ys

    return make(n_train), make(n_test)


def make_tiny_bert(folder, hidden: int = 32, layers: int = 2, num_labels: int = 3, seed: int = 0) -> Path:
    """Save a BertForSequenceClassification (2 layers, hidden 32) and its tokenizer into ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = Path(folder)
    vocab = {w: i for i, w in enumerate(SPECIAL + [w for g in GROUPS for w in g])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def tiny_llama_config(**overrides):
    """A LlamaConfig of a few thousand weights, tied embedding/head like SmolLM2 (fields overridable)."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaConfig(**{**fields, **overrides})
