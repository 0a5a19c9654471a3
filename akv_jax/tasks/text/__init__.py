"""RULER's synthetic tasks as English prompts for a real tokenizer and chat template.

The toy-model tasks in akv_jax.tasks speak in token ids; these speak English, with RULER's own templates, answer
prefixes and metrics (NVIDIA/RULER scripts/data/synthetic, scripts/eval/synthetic), so a pretrained chat model
can be scored with and without KV-cache compression. The package imports no model code: it receives a
`tokenizers.Tokenizer` and a function rendering the chat template.

  niah_single_noise        RULER niah_single_1: one needle in the repeated noise sentence
  niah_single_shakespeare  niah_single_2 with Shakespeare's plays in place of Paul Graham's essays
  niah_multikey            niah_multikey_1: 4 needles with distinct keys, one asked for (plays haystack)
  niah_multivalue          4 values under one key, all asked for (plays haystack)
  niah_multiquery          4 keys, all asked for (plays haystack)
  variable_tracking        vt: one chain of 4 hops  VAR A = 12345, VAR B = VAR A, ..  in noise, one solved example
  common_words             cwe: the 10 most common words of a numbered list, one solved example
  frequent_words           fwe: the 3 most frequent words of a Zipf (alpha 2) coded text

Every sample splits into context_ids (chat header, instruction, haystack) and question_ids (question, end of the
user turn, assistant header, answer prefix): prefill both for question-aware compression, or compress the context
first and extend by the question for question-agnostic compression. Typical use:

    from akv_jax.tasks import text
    samples = text.make_samples("niah_single_noise", 8, 4096, tokenizer, chat=render, seed=0)
    generated = [...]  # the model's continuation of each sample's context_ids + question_ids, decoded
    print(text.score_batch(generated, samples))

`generate` searches the haystack size so the prompt has at most `length` tokens and falls short by less than one
haystack unit (a noise sentence, a play line, a word): at most 24 tokens on SmolLM2's tokenizer from 1k to 128k.

`play_text(name)` gives a play as long clean text, for continuation (perplexity) measurements.
"""

from akv_jax.tasks.text.haystack import NOISE as NOISE
from akv_jax.tasks.text.haystack import play_names as play_names
from akv_jax.tasks.text.haystack import play_text as play_text
from akv_jax.tasks.text.needles import NeedleTask as NeedleTask
from akv_jax.tasks.text.needles import VariableTracking as VariableTracking
from akv_jax.tasks.text.prompt import ChatFn as ChatFn
from akv_jax.tasks.text.prompt import TextSample as TextSample
from akv_jax.tasks.text.ruler import TASK_NAMES as TASK_NAMES
from akv_jax.tasks.text.ruler import TASKS as TASKS
from akv_jax.tasks.text.ruler import TextTask as TextTask
from akv_jax.tasks.text.ruler import generate as generate
from akv_jax.tasks.text.ruler import get_task as get_task
from akv_jax.tasks.text.ruler import make_samples as make_samples
from akv_jax.tasks.text.scoring import score as score
from akv_jax.tasks.text.scoring import score_batch as score_batch
from akv_jax.tasks.text.scoring import string_match_all as string_match_all
from akv_jax.tasks.text.scoring import string_match_part as string_match_part
from akv_jax.tasks.text.words import CommonWords as CommonWords
from akv_jax.tasks.text.words import FrequentWords as FrequentWords
