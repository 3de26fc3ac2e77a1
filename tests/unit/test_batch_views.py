"""A bulk submit's body (``api.batch_views``) is the bytes ``TaskBatchPublic`` dumps.

The endpoint serializes plain dicts against a TypedDict made from ``TaskPublic``'s fields
instead of building a model per task; any difference in a value's form (a time's zone or
precision, an enum, a nested reason, a replayed task's result) would change what clients
read, so every kind of view is checked byte for byte against the model's own dump.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from api.batch_views import batch_json, view_fields
from api.schemas import TaskBatchPublic, TaskPublic
from throttler.statuses import TaskStatus
from throttler.store.reads import TaskView
from throttler.submit import NewTask

NOW = datetime(2026, 11, 29, 12, 0, 0, 123456, tzinfo=UTC)
_moments = st.one_of(
    st.none(),
    st.integers(min_value=-(10**9), max_value=10**9).map(
        lambda us: NOW + timedelta(microseconds=us)
    ),
)
_labels = st.lists(st.sampled_from(["connector:c1", "tenant:t3", 'k:é/"x"']), unique=True)

_submitted = st.builds(
    lambda task_id, name, priority, run_at, labels: NewTask(
        task_id=task_id,
        name=name,
        account="acct",
        payload={"name": "x"},
        created_at=NOW,
        priority=priority,
        run_at=run_at,
        labels=tuple(sorted(labels)),
    ),
    st.uuids().map(str),
    st.sampled_from(["greeting", "download", "ünïcode\u2028"]),
    st.integers(min_value=0, max_value=10),
    _moments,
    _labels,
)
_replayed = st.builds(
    lambda status, result, error, moments, labels: TaskPublic.from_task(
        TaskView(
            task_id="01a2297b-6122-7394-b78a-74d510a9b61b",
            name="greeting",
            status=status,
            host=None,
            result=result,
            error=error,
            attempts=2,
            priority=5,
            created_at=NOW,
            run_at=moments[0],
            queued_at=moments[1],
            started_at=moments[2],
            finished_at=moments[3],
            labels=tuple(sorted(labels)),
        )
    ),
    st.sampled_from(list(TaskStatus)),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5))),
    st.one_of(st.none(), st.text(max_size=20)),
    st.tuples(_moments, _moments, _moments, _moments),
    _labels,
)


# No deadline: a loaded CI machine's pause is no failure of the bytes.
@settings(deadline=None)
@given(st.lists(st.one_of(_submitted, _replayed), min_size=1, max_size=8))
def test_a_batch_body_is_what_the_model_dumps(items: list[NewTask | TaskPublic]) -> None:
    fields = [
        view_fields(item) if isinstance(item, TaskPublic) else TaskPublic.pending_fields(item)
        for item in items
    ]
    models = [item if isinstance(item, TaskPublic) else TaskPublic.pending(item) for item in items]
    assert batch_json(fields) == TaskBatchPublic(tasks=models).model_dump_json().encode()
