"""RULER-style synthetic long-context tasks: data generation and exact scoring, numpy only.

A small decoder is trained on these tasks and then evaluated with compressed KV caches; the accuracy drop
measures the compression. Every answer depends on records anywhere in a prompt of exactly the requested length,
and every score is an exact rule on token ids. This package imports no model code.

Shapes: B batch, S prompt length (the cache length), T tokens of one prompt, A answer tokens (EOS included),
L training tokens (T + A, padded).

Prompts are  BOS <task marker> body QUERY query..;  answers follow the query and end with EOS (formats in each
task module):

  niah_single        body: words with  KEY k v v (v v)              QUERY k        -> v v (v v) EOS
  niah_multikey      4 needles, distinct keys                       QUERY k        -> v.. EOS
  niah_multivalue    4 needles, one shared key                      QUERY k        -> v.. SEP v.. SEP .. EOS
  niah_multiquery    4 needles, 2-4 keys queried                    QUERY k k ..   -> v.. SEP v.. .. EOS
  variable_tracking  VAR v x1, VAR x1 x2, .. (2 chains)             QUERY v        -> x1 x2 .. EOS
  common_words       a word list with 3 common words                QUERY          -> w w w EOS
  frequent_words     a Zipf word stream                             QUERY          -> w w w EOS

Typical use:

    from akv_jax import tasks
    vocab = tasks.Vocab()
    rng = np.random.default_rng(0)
    batch = tasks.make_batch(tasks.TASK_NAMES, rng, 2048, vocab, 14)   # prompts: i32[14, 2048]
    tokens, loss_mask = tasks.training_batch(batch.samples, length=2048 + 32)
    scores = tasks.score_batch(generated, batch.samples)              # generated: i32[14, A']
    print(tasks.describe(batch.samples[0], vocab))
"""

from akv_jax.tasks.base import Sample as Sample
from akv_jax.tasks.base import Task as Task
from akv_jax.tasks.niah import NeedleTask as NeedleTask
from akv_jax.tasks.recall import recall_queries as recall_queries
from akv_jax.tasks.recall import recall_stream as recall_stream
from akv_jax.tasks.ruler import TASKS as TASKS
from akv_jax.tasks.ruler import Batch as Batch
from akv_jax.tasks.ruler import describe as describe
from akv_jax.tasks.ruler import get_task as get_task
from akv_jax.tasks.ruler import make_batch as make_batch
from akv_jax.tasks.ruler import score_batch as score_batch
from akv_jax.tasks.ruler import training_batch as training_batch
from akv_jax.tasks.ruler import training_sequence as training_sequence
from akv_jax.tasks.tracking import VariableTracking as VariableTracking
from akv_jax.tasks.vocab import TASK_NAMES as TASK_NAMES
from akv_jax.tasks.vocab import Vocab as Vocab
from akv_jax.tasks.words import CommonWords as CommonWords
from akv_jax.tasks.words import FrequentWords as FrequentWords
