"""English RULER tasks (akv_jax.tasks.text) on a small byte-level BPE tokenizer trained here, with ChatML turns."""

import collections
import dataclasses
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from akv_jax.tasks import text
from akv_jax.tasks.text import haystack, needles, prompt, words

START, END = "<|im_start|>", "<|im_end|>"
# Haystack units are a noise sentence, a play line, one distinct word or one Zipf step; on this tokenizer none
# exceeds 64 tokens, so that is the admitted shortfall below the target length.
MARGIN = 64


def chat(user: str) -> str:
  return f"{START}system\nYou are a helpful AI assistant.{END}\n{START}user\n{user}{END}\n{START}assistant\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  """Byte-level BPE, 2000 tokens, trained on two plays, RULER's templates and the cwe word list."""
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=[START, END], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [text.play_text("hamlet"), text.play_text("macbeth"), words._numbered(list(haystack.common_word_pool())),
            *needles.NIAH_ONE, *needles.NIAH_MANY, needles.VT_INSTRUCTION, needles.VT_QUESTION,
            needles.VT_ANSWER_PREFIX, words.CWE_INSTRUCTION, words.FWE_INSTRUCTION, words.FWE_QUESTION,
            *[text.NOISE] * 20]
  t.train_from_iterator(corpus, trainer)
  return t


@pytest.fixture(scope="module")
def samples(tok) -> dict[tuple[str, int], tuple[text.TextSample, ...]]:
  return {(name, length): text.make_samples(name, 2, length, tok, chat, seed=0)
          for name in text.TASK_NAMES for length in (1024, 4096)}


def decode(tok: Tokenizer, ids) -> str:
  return tok.decode(list(ids), skip_special_tokens=False)


def test_special_tokens_encode_as_one_id(tok):
  assert tok.encode(f"{START}user\nhi{END}", add_special_tokens=False).ids[0] == tok.token_to_id(START)
  assert tok.encode(f"x{END}", add_special_tokens=False).ids[-1] == tok.token_to_id(END)


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("name", text.TASK_NAMES)
def test_length_within_margin(samples, name, length):
  for s in samples[name, length]:
    assert s.task == name and s.metric == "all"
    assert length - MARGIN <= s.length <= length, (s.length, length)
    assert s.prompt_ids == s.context_ids + s.question_ids


def test_longer_length_within_margin(tok):
  (s,) = text.make_samples("niah_single_shakespeare", 1, 16384, tok, chat, seed=3)
  assert 16384 - MARGIN <= s.length <= 16384


@pytest.mark.parametrize("name", text.TASK_NAMES)
def test_split_at_question_start(tok, samples, name):
  start, end = tok.token_to_id(START), tok.token_to_id(END)
  for s in samples[name, 1024]:
    rendered = chat(s.context + s.question)
    head = rendered[:rendered.rfind(s.question)]
    assert s.context_ids == tuple(tok.encode(head, add_special_tokens=False).ids)
    assert decode(tok, s.context_ids) == head and head.endswith(s.context)
    assert decode(tok, s.question_ids) == s.question + f"{END}\n{START}assistant\n" + s.answer_prefix
    assert decode(tok, s.question_ids).startswith(s.question)
    # system and user headers, the system turn's end in the context; the user turn's end and the assistant
    # header in the question, each one special id.
    assert (s.context_ids.count(start), s.context_ids.count(end)) == (2, 1)
    assert (s.question_ids.count(start), s.question_ids.count(end)) == (1, 1)


def test_raw_mode_without_template(tok):
  (s,) = text.make_samples("niah_multivalue", 1, 1024, tok, None, seed=0)
  assert s.context_ids == tuple(tok.encode(s.context, add_special_tokens=False).ids)
  assert s.question_ids == tuple(tok.encode(s.question + s.answer_prefix, add_special_tokens=False).ids)
  assert 1024 - MARGIN <= s.length <= 1024
  assert tok.token_to_id(START) not in s.prompt_ids


def test_templates_are_rulers(samples):
  (s, _) = samples["niah_single_noise", 1024]
  key = re.search(r"for (\S+) mentioned", s.question).group(1)
  assert s.context.startswith("A special magic number is hidden within the following text. Make sure to memorize "
                              "it. I will quiz you about the number afterwards.\n")
  assert s.question == f"\nWhat is the special magic number for {key} mentioned in the provided text?"
  assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
  (s, _) = samples["niah_multivalue", 1024]
  assert s.context.startswith("Some special magic numbers are hidden")
  assert s.question.startswith("\nWhat are all the special magic numbers for ")
  assert s.answer_prefix.endswith(" mentioned in the provided text are")
  (s, _) = samples["niah_multiquery", 1024]
  assert re.fullmatch(r"\nWhat are all the special magic numbers for \S+, \S+, \S+, and \S+ mentioned in the "
                      r"provided text\?", s.question)
  (s, _) = samples["variable_tracking", 1024]
  assert s.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, 5 "
                             f"variables are assigned the value {s.question.split()[-5]}, they are: ")
  (s, _) = samples["common_words", 1024]
  assert s.question == "\nQuestion: What are the 10 most common words in the above list?"
  assert s.answer_prefix == " Answer: The top 10 words that appear most often in the list are:"
  (s, _) = samples["frequent_words", 1024]
  assert s.context.startswith("Read the following coded text and track the frequency of each coded word. Find the "
                              "three most frequently appeared coded words. ")
  assert s.answer_prefix == " Answer: According to the coded text above, the three most frequently appeared words are:"


NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")


@pytest.mark.parametrize("name,keys,values,queries", [
    ("niah_single_noise", 1, 1, 1), ("niah_single_shakespeare", 1, 1, 1), ("niah_multikey", 4, 1, 1),
    ("niah_multivalue", 1, 4, 1), ("niah_multiquery", 4, 1, 4)])
def test_needles_hold_the_answers(samples, name, keys, values, queries):
  for length in (1024, 4096):
    for s in samples[name, length]:
      found = NEEDLE.findall(s.context)
      assert len(found) == keys * values and len({k for k, _ in found}) == keys
      by_key = collections.defaultdict(list)
      for k, v in found:
        by_key[k].append(v)
      asked = [k for k in by_key if k in s.question]
      assert len(asked) == queries and all(s.context.count(v) == 1 for v in s.outputs)
      assert sorted(s.outputs) == sorted(v for k in asked for v in by_key[k])
      assert 0.0 <= s.depth <= 1.0
      assert all(len(v) == 7 and f" {v}." in s.context for v in s.outputs)


def test_noise_depth_is_the_needle_line(samples):
  for s in samples["niah_single_noise", 4096]:
    lines = s.context.split("\n")[1:]
    at = next(i for i, x in enumerate(lines) if NEEDLE.fullmatch(x))
    assert set(lines) - {lines[at]} == {text.NOISE}
    assert s.depth == at / (len(lines) - 1)


def test_shakespeare_haystack_is_play_text(samples):
  a, b = samples["niah_single_shakespeare", 4096]
  for s in (a, b):
    body = s.context.split("\n", 1)[1]
    assert text.NOISE not in body and re.search(r"^[A-Z][A-Za-z ]+:$", body, re.M)
    assert "**" not in body and "\\" not in body
  assert a.context.split("\n")[1:4] != b.context.split("\n")[1:4]  # a random offset per sample


def test_variable_tracking_chain(samples):
  for length in (1024, 4096):
    for s in samples["variable_tracking", length]:
      shot, main = s.context.rsplit(needles.VT_INSTRUCTION, 1)
      assert shot.startswith(needles.VT_INSTRUCTION) and "they are: " in shot  # RULER's solved example first
      value = re.search(r"the value (\d{5}) in", s.question).group(1)
      assign = dict(re.findall(r"^VAR ([A-Z]{5}) = (?:VAR )?(\w+) ?$", main, re.M))

      def resolve(name):
        for _ in range(len(assign)):
          name = assign.get(name, name)
        return name

      reach = {v for v in assign if resolve(v) == value}
      assert len(s.outputs) == 5 and reach == set(s.outputs)
      chain_lines = [main.index(f"VAR {v} =") for v in s.outputs]
      assert chain_lines == sorted(chain_lines)  # statements appear in chain order
      assert all(re.fullmatch(r"[A-Z]{5}", v) for v in s.outputs)


@pytest.mark.parametrize("length,common,rare", [(1024, 6, 1), (4096, 30, 3)])
def test_common_words_are_the_most_frequent(samples, length, common, rare):
  for s in samples["common_words", length]:
    shot, listing = s.context.rsplit("\n" + words.CWE_INSTRUCTION + "\n", 1)
    # RULER's solved example: the same template, its answer prefix and the numbered answer, then the task.
    assert shot.startswith(words.CWE_INSTRUCTION + "\n1. ")
    assert re.search(r"\nQuestion: What are the 10 most common words in the above list\? Answer: The top 10 words "
                     r"that appear most often in the list are: 1\. .+ 10\. [^.]+$", shot)
    entries = re.split(r"(?:^| )(\d+)\. ", listing)[1:]
    numbers, items = [int(x) for x in entries[0::2]], entries[1::2]
    assert numbers == list(range(1, len(items) + 1))
    counts = collections.Counter(items)
    assert len(s.outputs) == 10 and all(counts[w] == common for w in s.outputs)
    assert set(counts.values()) == {common, rare} and len(counts) > 10


@pytest.mark.parametrize("length", [1024, 4096])
def test_frequent_words_are_the_top_three(samples, length):
  for s in samples["frequent_words", length]:
    coded = s.context[len(words.FWE_INSTRUCTION) + 1:].split(" ")
    counts = collections.Counter(coded)
    assert counts.most_common(1)[0][0] == "..."
    del counts["..."]
    ranked = counts.most_common()
    assert {w for w, _ in ranked[:3]} == set(s.outputs) and ranked[2][1] > ranked[3][1]
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in coded if w != "...")


def test_deterministic_by_seed(tok, samples):
  for name in text.TASK_NAMES:
    again = text.make_samples(name, 2, 1024, tok, chat, seed=0)
    assert again == samples[name, 1024]
    other = text.make_samples(name, 2, 1024, tok, chat, seed=1)
    assert [s.context for s in other] != [s.context for s in again]
  rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
  assert text.generate("common_words", rng_a, 1024, tok, chat) == text.generate("common_words", rng_b, 1024, tok,
                                                                                 chat)


def test_scoring_rules(samples):
  for name in text.TASK_NAMES:
    for s in samples[name, 1024]:
      assert text.score(" " + ", ".join(s.outputs) + ".", s) == 1.0
      assert text.score("I do not know.", s) == 0.0
  s = samples["niah_multivalue", 1024][0]
  assert text.score(f"{s.outputs[0]} and {s.outputs[2]}", s) == 0.5
  s = samples["common_words", 1024][0]
  assert text.score(" ".join(w.upper() for w in s.outputs[:3]), s) == pytest.approx(0.3)
  assert text.score("\x00 " + " ".join(s.outputs) + "\t", s) == 1.0
  assert text.string_match_all("The Cat sat", ["cat", "dog"]) == 0.5
  assert text.string_match_part("The Cat sat", ["cat", "dog"]) == 1.0
  assert text.string_match_part("The bird", ["cat", "dog"]) == 0.0
  part = dataclasses.replace(s, metric="part")
  assert text.score(s.outputs[4], part) == 1.0 and text.score("none", part) == 0.0
  v = samples["niah_single_noise", 1024][0]
  got = text.score_batch([" ".join(s.outputs), "", v.outputs[0]], [s, s, v])
  assert got == {"common_words": 0.5, "niah_single_noise": 1.0, "average": 0.75}


def test_fit_finds_the_largest_fitting_size():
  rng = np.random.default_rng(0)
  for _ in range(50):
    steps = rng.integers(0, 40, size=3000)
    cum = 100 + np.cumsum(steps)
    target = int(rng.integers(cum[0], cum[-1]))
    calls = []
    n = prompt.fit(lambda k: calls.append(k) or int(cum[k]), 0, len(cum) - 1, target, "t")
    assert n == int(np.searchsorted(cum, target, side="right")) - 1
    assert len(set(calls)) <= 30


def test_play_text():
  names = text.play_names()
  assert len(names) >= 37 and "hamlet" in names and names == tuple(sorted(names))
  hamlet = text.play_text("hamlet")
  assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I.") and len(hamlet) > 150_000
  assert "HAMLET:\nTo be, or not to be: that is the question:" in hamlet
  assert not re.search(r"\*\*|^#|\\|_", hamlet, re.M)
  assert text.play_text("Hamlet") is hamlet
  assert all(len(text.play_text(n)) > 50_000 for n in names)


def test_errors(tok, samples):
  s = samples["niah_single_noise", 1024][0]
  with pytest.raises(ValueError, match=r"unknown task 'nope'; choose one of niah_single_noise, "):
    text.make_samples("nope", 1, 1024, tok, chat)
  with pytest.raises(ValueError, match=r"length=60 is too short for niah_single_noise: .* at least \d+"):
    text.make_samples("niah_single_noise", 1, 60, tok, chat)
  with pytest.raises(ValueError, match=r"length=300 is too short for common_words"):
    text.make_samples("common_words", 1, 300, tok, chat)
  for bad in (1024.0, True, 0):
    with pytest.raises(ValueError, match=r"length=.* must be an int >= 1"):
      text.make_samples("frequent_words", 1, bad, tok, chat)
  with pytest.raises(ValueError, match=r"too long for t: its haystack runs out at 50 tokens"):
    prompt.fit(lambda k: 10 * k, 1, 5, 1000, "t")
  with pytest.raises(ValueError, match=r"n=0 must be an int >= 1"):
    text.make_samples("niah_multikey", 0, 1024, tok, chat)
  with pytest.raises(ValueError, match=r"seed=-1 must be an int >= 0"):
    text.make_samples("niah_multikey", 1, 1024, tok, chat, seed=-1)
  with pytest.raises(ValueError, match=r"rng=0 must be a numpy.random.Generator"):
    text.generate("niah_multikey", 0, 1024, tok, chat)
  with pytest.raises(ValueError, match=r"chat must render the user text verbatim"):
    text.make_samples("niah_multikey", 1, 1024, tok, lambda user: user.upper())
  with pytest.raises(ValueError, match=r"chat returned list"):
    text.make_samples("niah_multikey", 1, 1024, tok, lambda user: [user])
  with pytest.raises(ValueError, match=r"unknown play 'nope'; choose one of .*hamlet"):
    text.play_text("nope")
  with pytest.raises(ValueError, match=r"haystack='essay' must be one of noise, shakespeare"):
    text.NeedleTask(name="x", haystack="essay")
  with pytest.raises(ValueError, match=r"num_queries=2 must be <= num_keys=1"):
    text.NeedleTask(name="x", haystack="noise", num_queries=2)
  with pytest.raises(ValueError, match=r"num_keys \* num_values=41 needles do not fit the 40 depths"):
    text.NeedleTask(name="x", haystack="shakespeare", num_keys=41)
  with pytest.raises(ValueError, match=r"num_values=0 must be an int >= 1"):
    text.NeedleTask(name="x", haystack="noise", num_values=0)
  with pytest.raises(ValueError, match=r"num_hops=0 must be an int >= 1"):
    text.VariableTracking(num_hops=0)
  with pytest.raises(ValueError, match=r"freq_cw=3 must be an int > freq_ucw=3"):
    text.CommonWords(freq_cw=3)
  with pytest.raises(ValueError, match=r"alpha=1.0 must be a number > 1"):
    text.FrequentWords(alpha=1.0)
  with pytest.raises(ValueError, match=r"coded_wordlen=1 must be an int >= 2"):
    text.FrequentWords(coded_wordlen=1)
  with pytest.raises(ValueError, match=r"prediction must be a str, got int"):
    text.score(1234567, s)
  with pytest.raises(ValueError, match=r"references=\[\] must be a non-empty sequence"):
    text.string_match_all("x", [])
  with pytest.raises(ValueError, match=r"sample.metric='exact' must be one of all, part"):
    text.score("x", dataclasses.replace(s, metric="exact"))
  with pytest.raises(ValueError, match=r"predictions must be a sequence of 2 strings"):
    text.score_batch(["x"], [s, s])
