"""A byte-level BPE tokenizer trained offline on a corpus (for models trained from a config, when no
pretrained tokenizer is at hand). Cached on disk by a hash of the texts and the settings."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

EOS = "<|endoftext|>"


def train_bpe(texts: list[str], cache_dir: str | Path, vocab_size: int = 4096, min_frequency: int = 2):
    """The GPT-2 scheme (byte-level BPE, one end-of-text token) fitted to `texts`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode())
    digest.update(f"{vocab_size}-{min_frequency}".encode())
    target = Path(cache_dir) / f"bpe-{vocab_size}-{digest.hexdigest()[:12]}"
    if not target.exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                show_progress=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                      unk_token=EOS, pad_token=EOS)
        tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another job finished first: keep theirs
            pass
    return PreTrainedTokenizerFast.from_pretrained(str(target))
