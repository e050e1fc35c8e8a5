"""Train the tiny speculative-decoding pair the tests and the demo serve with vLLM.

A target (Llama architecture, 4 layers, hidden 256) learns next-token prediction on Python's own standard
library sources, which every machine with Python has; a draft (1 layer, hidden 128) is then distilled from
the target's output distribution. Both share one byte-level BPE tokenizer (vocab 4096). Fixed seeds and a
fixed number of steps make the run repeatable on one machine; on 2 CPU cores it takes about 10 minutes.

    python tools/train_tiny_pair.py --out models        # writes models/tiny-target, models/tiny-draft

Needs torch, transformers and tokenizers (the vLLM virtualenv has them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
VOCAB = 4096
SEQ = 128
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}{% endif %}"
)


def corpus_files(limit_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    files += sorted(p for p in root.glob("[a-z]*/*.py") if "test" not in p.parts[-2] and p.is_file())
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > limit_bytes:
            continue
        chosen.append(path)
        total += size
    return chosen


def train_tokenizer(texts: list[str], out: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def batches(ids: torch.Tensor, batch: int, rng: random.Random):
    while True:
        starts = [rng.randrange(0, len(ids) - SEQ - 1) for _ in range(batch)]
        yield torch.stack([ids[s : s + SEQ + 1] for s in starts])


def lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * 3.14159)).item()))


def config(hidden: int, layers: int, heads: int, inter: int, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--target-steps", type=int, default=450)
    parser.add_argument("--draft-steps", type=int, default=350)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--corpus-mb", type=float, default=4.0)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()

    files = corpus_files(int(args.corpus_mb * 1024 * 1024))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    tokenizer = train_tokenizer(texts, args.out)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(eos)
    data = torch.tensor(ids, dtype=torch.long)
    print(f"corpus: {len(files)} files, {len(data)} tokens ({time.time() - t0:.0f}s)", flush=True)

    target = LlamaForCausalLM(config(256, 4, 4, 688, tokenizer))
    opt = torch.optim.AdamW(target.parameters(), lr=3e-3, weight_decay=0.01)
    stream = batches(data, args.batch, rng)
    target.train()
    for step in range(args.target_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.target_steps, 3e-3)
        batch = next(stream)
        loss = target(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(target.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.target_steps - 1:
            print(f"target step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)

    draft = LlamaForCausalLM(config(128, 1, 2, 344, tokenizer))
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3, weight_decay=0.01)
    target.eval()
    draft.train()
    for step in range(args.draft_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.draft_steps, 3e-3)
        batch = next(stream)[:, :-1]
        with torch.no_grad():
            teacher = F.log_softmax(target(input_ids=batch).logits, dim=-1)
        student = F.log_softmax(draft(input_ids=batch).logits, dim=-1)
        loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean") / batch.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.draft_steps - 1:
            print(f"draft step {step} kl {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)

    for name, model in (("tiny-target", target), ("tiny-draft", draft)):
        path = args.out / name
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        (path / "TRAINING.json").write_text(
            json.dumps(
                {
                    "seed": SEED,
                    "corpus": "CPython standard library *.py (tests excluded)",
                    "corpus_files": len(files),
                    "corpus_tokens": len(data),
                    "target_steps": args.target_steps,
                    "draft_steps": args.draft_steps,
                    "batch": args.batch,
                    "seq_len": SEQ,
                    "python": sys.version.split()[0],
                    "torch": torch.__version__,
                },
                indent=2,
            )
            + "\n"
        )
    print(f"wrote {args.out}/tiny-target and {args.out}/tiny-draft in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
