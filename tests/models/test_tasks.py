"""akv_jax.tasks: exact lengths, determinism, answers recomputed by an independent solver, scoring rules, errors."""

import ast
import collections
import pathlib

import numpy as np
import pytest

from akv_jax import tasks
from akv_jax.tasks.vocab import BOS, EOS, KEY, PAD, QUERY, SEP, VAR

VOCAB = tasks.Vocab()
LENGTHS = (64, 512, 1000, 2048)
SAMPLES_PER_CASE = 50


def solve(prompt: np.ndarray, vocab: tasks.Vocab) -> list[int]:
  """Recompute the answer from the prompt tokens alone, by parsing and brute force (shares no task code)."""
  p = prompt.tolist()
  assert p[0] == BOS and p.count(QUERY) == 1
  task = vocab.name(p[1]).strip("<>")
  q = p.index(QUERY)
  body, query = p[2:q], p[q + 1:]
  keys, values, words = set(vocab.key_ids), set(vocab.value_ids), set(vocab.word_ids)

  if task.startswith("niah"):
    needles, i = [], 0
    while i < len(body):
      if body[i] == KEY:
        assert body[i + 1] in keys
        j = i + 2
        while j < len(body) and body[j] in values:
          j += 1
        assert j > i + 2, "a needle without values"
        needles.append((body[i + 1], body[i + 2:j]))
        i = j
      else:
        assert body[i] in words, vocab.name(body[i])
        i += 1
    if task == "niah_multivalue":
      assert len(query) == 1 and len(needles) == 4 and len({k for k, _ in needles}) == 1
    else:
      assert len({k for k, _ in needles}) == len(needles), "keys must be distinct"
      assert set(query) <= {k for k, _ in needles} and len(set(query)) == len(query)
    # Every needle whose key is queried, in prompt order.
    groups = [v for k, v in needles if k in query]
    out = []
    for g in groups:
      out += ([SEP] if out else []) + g
    return out + [EOS]

  if task == "variable_tracking":
    assign, order, i = {}, [], 0
    while i < len(body):
      if body[i] == VAR:
        src, name = body[i + 1:i + 3]
        assert name in keys and name not in assign
        assign[name] = src
        order.append(name)
        i += 3
      else:
        assert body[i] in words
        i += 1

    def resolve(x):
      while x in assign:
        x = assign[x]
      return x

    assert len(query) == 1 and query[0] in values
    return [x for x in order if resolve(x) == query[0]] + [EOS]

  assert task in ("common_words", "frequent_words") and not query
  assert all(t in words for t in body)
  counts = collections.Counter(body)
  first = {w: body.index(w) for w in counts}
  ranked = sorted(counts, key=lambda w: (-counts[w], first[w]))
  top = [counts[w] for w in ranked[:4]]
  assert all(a > b for a, b in zip(top, top[1:])), f"tie among the top counts {top}"
  if task == "common_words":
    assert top[2] >= 2 * top[3], "rare words must stay at most half the least common word's count"
  return ranked[:3] + [EOS]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_answer_recomputed_from_prompt(name, length):
  rng = np.random.default_rng([length, tasks.TASK_NAMES.index(name)])
  task = tasks.get_task(name)
  for _ in range(SAMPLES_PER_CASE):
    s = task.generate(rng, length, VOCAB)
    assert s.task == name
    assert s.prompt.dtype == np.int32 and s.prompt.shape == (length,)
    assert s.answer.dtype == np.int32 and s.answer[-1] == EOS and EOS not in s.answer[:-1]
    assert s.prompt.min() > PAD and s.prompt.max() < VOCAB.size
    assert s.answer.min() > PAD and s.answer.max() < VOCAB.size
    assert solve(s.prompt, VOCAB) == s.answer.tolist()
    marker = {"variable_tracking": VAR}.get(name, KEY)
    assert all(s.prompt[e] == marker for e in s.evidence)
    assert task.score(s.answer, s) == 1.0
    assert len(s.answer) <= task.max_answer_length()


def test_needle_depths_cover_the_prompt():
  rng = np.random.default_rng(7)
  depths = [tasks.get_task("niah_single").generate(rng, 512, VOCAB).evidence[0] / 512 for _ in range(300)]
  assert min(depths) < 0.05 and max(depths) > 0.93


def test_max_answer_length_is_reached():
  longest = {n: 0 for n in tasks.TASK_NAMES}
  batch = tasks.make_batch(tasks.TASK_NAMES, np.random.default_rng(11), 128, VOCAB, 7 * 400)
  for s in batch.samples:
    longest[s.task] = max(longest[s.task], len(s.answer))
  assert longest == {n: t.max_answer_length() for n, t in tasks.TASKS.items()}
  assert longest == {"niah_single": 5, "niah_multikey": 5, "niah_multivalue": 16, "niah_multiquery": 16,
                     "variable_tracking": 5, "common_words": 4, "frequent_words": 4}


def test_describe():
  s = tasks.get_task("niah_single").generate(np.random.default_rng(0), 2048, VOCAB)
  text = tasks.describe(s, VOCAB)
  needle = " ".join(VOCAB.decode(s.prompt[s.evidence[0]:s.evidence[0] + len(s.answer) + 1]))
  assert text.startswith(f"niah_single: T=2048 A={len(s.answer)} evidence at [{s.evidence[0]}]\n")
  assert needle in text and "words)..." in text and len(text) < 600
  assert text.endswith(f"  answer: {VOCAB.describe(s.answer)}")
  full = tasks.describe(s, VOCAB, max_run=None)
  assert f"  prompt: {VOCAB.describe(s.prompt)}\n" in full


def test_same_seed_same_batch():
  def draw(seed):
    return tasks.make_batch(tasks.TASK_NAMES, np.random.default_rng(seed), 512, VOCAB, 14)

  a, b, c = draw(3), draw(3), draw(4)
  for field in ("prompts", "lengths", "answers", "answer_lengths"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert [s.evidence for s in a.samples] == [s.evidence for s in b.samples]
  assert not np.array_equal(a.prompts, c.prompts)


def test_batch_shapes_and_padding():
  lengths = [64, 100, 512, 64, 300]
  batch = tasks.make_batch(["niah_multiquery", "common_words"], np.random.default_rng(0), lengths, VOCAB, 5)
  assert batch.tasks == ("niah_multiquery", "common_words") * 2 + ("niah_multiquery",)
  assert batch.prompts.shape == (5, 512) and batch.prompts.dtype == np.int32
  np.testing.assert_array_equal(batch.lengths, lengths)
  assert batch.answers.shape == (5, batch.answer_lengths.max()) and batch.answers.dtype == np.int32
  for i, s in enumerate(batch.samples):
    n, a = lengths[i], batch.answer_lengths[i]
    np.testing.assert_array_equal(batch.prompts[i, :n], s.prompt)
    assert (batch.prompts[i, n:] == PAD).all() and (batch.prompts[i, :n] != PAD).all()
    np.testing.assert_array_equal(batch.answers[i, :a], s.answer)
    assert batch.answers[i, a - 1] == EOS and (batch.answers[i, a:] == PAD).all()
  same = tasks.make_batch("niah_single", np.random.default_rng(0), 256, VOCAB, 3)
  assert same.prompts.shape == (3, 256) and (same.lengths == 256).all() and (same.prompts != PAD).all()


def test_training_sequence_masks_only_the_answer():
  s = tasks.get_task("niah_multivalue").generate(np.random.default_rng(1), 128, VOCAB)
  tokens, mask = tasks.training_sequence(s)
  np.testing.assert_array_equal(tokens, np.concatenate([s.prompt, s.answer]))
  assert tokens.dtype == np.int32 and mask.dtype == bool
  assert not mask[:128].any() and mask[128:].all()
  # The prompt's last position (the queried key) is the input whose next-token target is the first answer token.
  assert tokens[:-1][mask[1:]][0] == s.prompt[-1] and s.prompt[-1] in VOCAB.key_ids

  samples = tasks.make_batch(tasks.TASK_NAMES, np.random.default_rng(2), [64, 80] * 3 + [64], VOCAB, 7).samples
  toks, masks = tasks.training_batch(samples, length=120)
  assert toks.shape == masks.shape == (7, 120)
  for i, s in enumerate(samples):
    t, m = tasks.training_sequence(s)
    np.testing.assert_array_equal(toks[i, :len(t)], t)
    assert (toks[i, len(t):] == PAD).all() and not masks[i, len(t):].any() and masks[i].sum() == len(s.answer)
  with pytest.raises(ValueError, match=r"length=70 is shorter than the longest sequence"):
    tasks.training_batch(samples, length=70)


def sample_of(task: str, answer: str) -> tasks.Sample:
  prompt = VOCAB.encode(f"<bos> <{task}> QUERY")
  return tasks.Sample(prompt=prompt, answer=VOCAB.encode(answer + " <eos>"), task=task)


@pytest.mark.parametrize("task, answer, prediction, expected", [
    ("niah_single", "v1 v2", "v1 v2 <eos> v7 v8", 1.0),        # everything after EOS is ignored
    ("niah_single", "v1 v2", "v1 v2", 1.0),                    # no EOS: the whole row is read
    ("niah_single", "v1 v2", "v1 <eos>", 0.0),                 # exact match: a prefix is wrong
    ("niah_single", "v1 v2", "v1 v2 v3", 0.0),
    ("niah_multikey", "v1 v2 v3", "v1 v2 v3 <eos>", 1.0),
    ("niah_multiquery", "v1 v2 SEP v3 SEP v4", "v1 v2 SEP v9 SEP v4", 2 / 3),
    ("niah_multiquery", "v1 v2 SEP v3 SEP v4", "v3 SEP v1 v2 SEP v4", 1.0),    # recall ignores order
    ("niah_multiquery", "v1 v2 SEP v3 SEP v4", "v1 v2", 1 / 3),
    ("niah_multiquery", "v1 v2 SEP v3", "v1 SEP v3", 0.5),                      # groups match whole
    ("niah_multivalue", "v1 SEP v2 v3 SEP v4 SEP v5", "v5 SEP v1 <eos>", 0.5),
    ("niah_multivalue", "v1 SEP v2 v3 SEP v4 SEP v5", "v1 SEP v2 SEP v4 SEP v5", 0.75),  # groups match whole
    ("niah_multivalue", "v1 SEP v2 SEP v3 SEP v4", "v6 SEP v7 SEP v8 SEP v9 SEP v1", 0.0),  # first 4 groups only
    ("variable_tracking", "k1 k2 k3", "k3 k1", 2 / 3),
    ("variable_tracking", "k1 k2 k3", "k1 k9 k2 k3", 2 / 3),   # over-generation earns nothing
    ("variable_tracking", "k1 k2 k3", "k3 k2 k1", 1.0),        # recall ignores order
    ("common_words", "w1 w2 w3", "w2 w2 w2", 1 / 3),
    ("frequent_words", "w1 w2 w3", "w3 w1 <eos> w2", 2 / 3),
])
def test_score_rules(task, answer, prediction, expected):
  assert tasks.get_task(task).score(VOCAB.encode(prediction), sample_of(task, answer)) == pytest.approx(expected)


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_empty_prediction_scores_zero(name):
  s = tasks.get_task(name).generate(np.random.default_rng(5), 256, VOCAB)
  task = tasks.get_task(name)
  assert task.score(np.zeros(0, np.int32), s) == 0.0
  assert task.score([EOS, *s.answer.tolist()], s) == 0.0


def test_score_batch_per_task_and_average():
  batch = tasks.make_batch(tasks.TASK_NAMES, np.random.default_rng(9), 256, VOCAB, 14)
  # Rows 0..6 answered perfectly (one of each task), rows 7..13 not at all; niah_single also gets row 7 right.
  preds = np.full((14, 24), PAD, np.int32)
  for i in [*range(7), 7]:
    preds[i, :batch.answers.shape[1]] = batch.answers[i]
  scores = tasks.score_batch(preds, batch.samples)
  assert list(scores) == [*tasks.TASK_NAMES, "average"]
  assert scores["niah_single"] == 1.0
  assert all(scores[n] == 0.5 for n in tasks.TASK_NAMES[1:])
  assert scores["average"] == pytest.approx((1.0 + 6 * 0.5) / 7)
  with pytest.raises(ValueError, match=r"predictions has shape \(13, 24\); expected \[B=14, A\]"):
    tasks.score_batch(preds[:13], batch.samples)


def test_vocab_layout_and_names():
  assert VOCAB.size == 7 + 7 + 64 + 64 + 256 <= 512
  groups = [range(7), range(7, 14), VOCAB.key_ids, VOCAB.value_ids, VOCAB.word_ids]
  assert [g.start for g in groups[1:]] == [g.stop for g in groups[:-1]]
  assert VOCAB.task_id("niah_single") == 7 and VOCAB.task_id("frequent_words") == 13
  assert VOCAB.describe([BOS, 7, KEY, VOCAB.key_ids[17], VOCAB.value_ids[3], VOCAB.word_ids[88], VAR]) == \
      "<bos> <niah_single> KEY k17 v3 w88 VAR"
  every = np.arange(VOCAB.size, dtype=np.int32)
  np.testing.assert_array_equal(VOCAB.encode(VOCAB.describe(every)), every)
  assert VOCAB.name(VOCAB.size) == f"<unk:{VOCAB.size}>"
  small = tasks.Vocab(num_keys=8, num_values=8, num_words=16)
  assert small.size == 7 + 7 + 32 and small.name(small.size - 1) == "w15"


def test_registry_matches_vocab_markers():
  assert tuple(tasks.TASKS) == tasks.TASK_NAMES == VOCAB.tasks
  assert all(t.name == n for n, t in tasks.TASKS.items())


def test_tasks_import_no_model_code():
  allowed = {"__future__", "dataclasses", "re", "typing", "numpy"}
  for path in pathlib.Path(tasks.__file__).parent.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        mods = [node.module]
      else:
        continue
      for m in mods:
        assert m in allowed or m == "akv_jax.tasks" or m.startswith("akv_jax.tasks."), f"{path.name} imports {m}"


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_length_too_short(name):
  task = tasks.get_task(name)
  need = task.min_length(VOCAB)
  assert len(task.generate(np.random.default_rng(0), need, VOCAB).prompt) == need
  with pytest.raises(ValueError, match=f"length={need - 1} is too short for {name}: .* at least {need} tokens"):
    task.generate(np.random.default_rng(0), need - 1, VOCAB)


@pytest.mark.parametrize("make, match", [
    (lambda: tasks.Vocab(num_keys=0), "num_keys=0 must be an int >= 1"),
    (lambda: tasks.Vocab(num_values=-3), "num_values=-3 must be an int >= 1"),
    (lambda: tasks.Vocab(num_words=2.5), "num_words=2.5 must be an int >= 1"),
    (lambda: tasks.Vocab(tasks=()), r"tasks=\(\) must be a non-empty tuple"),
    (lambda: tasks.Vocab(tasks=("a", "a")), "has repeated names"),
    (lambda: VOCAB.encode("KEY k64"), "token 'k64' is not in this vocab"),
    (lambda: VOCAB.encode("hello"), "token 'hello' is not in this vocab"),
    (lambda: tasks.NeedleTask(name="x", value_len=(3, 2)), r"value_len=\(3, 2\) must be a tuple \(lo, hi\)"),
    (lambda: tasks.NeedleTask(name="x", value_len=(0, 2)), r"value_len=\(0, 2\) must be a tuple"),
    (lambda: tasks.NeedleTask(name="x", num_needles=0), "num_needles=0 must be an int >= 1"),
    (lambda: tasks.NeedleTask(name="x", num_needles=2, num_queries=(1, 3)), "more keys than num_needles=2"),
    (lambda: tasks.NeedleTask(name="x", num_needles=2, num_queries=(2, 2), shared_key=True),
     r"num_queries=\(2, 2\) must be \(1, 1\) with shared_key"),
    (lambda: tasks.VariableTracking(num_chains=0), "num_chains=0 must be an int >= 1"),
    (lambda: tasks.VariableTracking(chain_len=(2,)), r"chain_len=\(2,\) must be a tuple"),
    (lambda: tasks.CommonWords(common_frac=1.0), r"common_frac=1.0 must be in \(0, 1\)"),
    (lambda: tasks.CommonWords(num_common=0), "num_common=0 must be an int >= 1"),
    (lambda: tasks.FrequentWords(alpha=0.0), "alpha=0.0 must be > 0"),
    (lambda: tasks.FrequentWords(num_top=0), "num_top=0 must be an int >= 1"),
    (lambda: tasks.FrequentWords(max_tries=0), "max_tries=0 must be an int >= 1"),
])
def test_bad_settings(make, match):
  with pytest.raises(ValueError, match=match):
    make()


RNG = np.random.default_rng


@pytest.mark.parametrize("call, match", [
    (lambda: tasks.get_task("nope"), "unknown task 'nope'; choose one of niah_single, "),
    (lambda: tasks.make_batch(["niah_single", "nope"], RNG(0), 64, VOCAB, 2), "unknown task 'nope'"),
    (lambda: tasks.make_batch([], RNG(0), 64, VOCAB, 2), "task_names is empty"),
    (lambda: tasks.make_batch("niah_single", RNG(0), 64, VOCAB, 0), "batch=0 must be an int >= 1"),
    (lambda: tasks.make_batch("niah_single", RNG(0), [64, 64], VOCAB, 3), "length has 2 entries for batch=3"),
    (lambda: tasks.make_batch("niah_single", RNG(0), [64, 8], VOCAB, 2), "length=8 is too short for niah_single"),
    (lambda: tasks.get_task("niah_single").generate(RNG(0), 64.0, VOCAB), "length=64.0 must be an int"),
    (lambda: tasks.get_task("niah_multiquery").generate(RNG(0), 256, tasks.Vocab(num_values=4)),
     "num_values=4 is too small for niah_multiquery: one sample draws up to 12 distinct ids"),
    (lambda: tasks.get_task("variable_tracking").generate(RNG(0), 256, tasks.Vocab(num_keys=5)),
     "num_keys=5 is too small for variable_tracking"),
    (lambda: tasks.get_task("common_words").generate(RNG(0), 2048, tasks.Vocab(num_words=20)),
     "num_words=20 is too small for common_words at length=2048"),
    (lambda: tasks.get_task("frequent_words").generate(RNG(0), 64, tasks.Vocab(num_words=3)),
     "num_words=3 is too small for frequent_words"),
    (lambda: tasks.FrequentWords(alpha=0.01, max_tries=3).generate(RNG(0), 28, VOCAB),
     "length=28 gave ties among the top 4 word counts in 3 draws"),
    (lambda: tasks.get_task("common_words").generate(RNG(0), 64, tasks.Vocab(tasks=("niah_single",))),
     "task 'common_words' has no marker in this vocab"),
    (lambda: tasks.get_task("niah_single").score(np.zeros((2, 3), np.int32), sample_of("niah_single", "v1")),
     r"prediction has shape \(2, 3\); expected one row"),
])
def test_bad_inputs(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_recall_queries_reads_the_stream():
  k1, k2, v1, v2, v3, w = 17, 18, 81, 82, 83, 145
  toks = np.array([BOS, KEY, k1, v1, w, KEY, k2, v2, v3, QUERY, k1, v1, EOS,
                   QUERY, k2, v2, v3, EOS, QUERY, k1])   # the last answer is cut off
  q = tasks.recall_queries(toks)
  np.testing.assert_array_equal(q["position"], [10, 14])
  np.testing.assert_array_equal(q["truth"], [v1, v2])
  np.testing.assert_array_equal(q["latest"], [v2, v2])
  np.testing.assert_array_equal(q["seen"], [2, 2])


def test_recall_stream_queries_only_seen_keys():
  vocab = tasks.Vocab()
  toks, mask = tasks.recall_stream(np.random.default_rng(0), 512, vocab, 16)
  q = tasks.recall_queries(toks)
  assert toks.shape == mask.shape == (512,) and q["position"].size > 10
  assert np.all(mask[q["position"] + 1]) and not np.any(mask[q["position"]])
  records = {int(toks[i + 1]): int(toks[i + 2]) for i in np.flatnonzero(toks == tasks.vocab.KEY) if i + 2 < 512}
  assert [records[int(toks[p])] for p in q["position"]] == q["truth"].tolist()
