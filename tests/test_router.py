"""The handler API's registrations: table names, ops, keys, handler names, and loading the
modules named in PGREACT_HANDLERS. Unit tests: no database."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Notification, Router
from pgreact.errors import HandlerLoadError, PgreactError, RouterError
from pgreact.router import TableName, load_routers


async def module_level_handler(event: Event, session: AsyncSession) -> None:
    """A handler defined at module level, for the default name."""


class Holder:
    @staticmethod
    async def nested(event: Event, session: AsyncSession) -> None:
        """A handler whose qualname has a dot."""


async def batch_handler(events: Sequence[Event], session: AsyncSession) -> None:
    """A batch handler."""


async def notify_handler(note: Notification) -> None:
    """An on_notify handler."""


# -- table names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "schema", "name"),
    [
        ("orders", "public", "orders"),
        ("public.orders", "public", "orders"),
        ("Sales.Orders", "sales", "orders"),  # unquoted parts fold to lower case
        ("ORDERS", "public", "orders"),
        ("  sales.orders  ", "sales", "orders"),
        ('"Orders"', "public", "Orders"),  # quoted parts keep their case
        ('"My Schema"."Odd.Name"', "My Schema", "Odd.Name"),
        ('"My Schema"."Order; drop table x"', "My Schema", "Order; drop table x"),
        ('"Order; drop table x"', "public", "Order; drop table x"),
        ('sales."Line ""Items"""', "sales", 'Line "Items"'),
        ('"a.b".c', "a.b", "c"),
        ('"x;y"."--z"', "x;y", "--z"),
    ],
)
def test_table_names_are_parsed_as_postgresql_does(text: str, schema: str, name: str) -> None:
    parsed = TableName.parse(text)
    assert (parsed.schema, parsed.name) == (schema, name)
    assert parsed.qualified == f"{schema}.{name}"
    assert str(parsed) == parsed.qualified


@pytest.mark.parametrize(
    "text",
    ["", "   ", "a.b.c", '"unterminated', 'schema."', ".orders", "orders.", "my table", '""'],
)
def test_invalid_table_names_are_rejected(text: str) -> None:
    with pytest.raises(RouterError) as info:
        TableName.parse(text)
    assert repr(text) in str(info.value) or text in str(info.value)


def test_a_registration_carries_the_parsed_table() -> None:
    router = Router()
    router.on('"My Schema"."Order; drop table x"', name="weird")(module_level_handler)
    router.on("Orders", name="plain")(module_level_handler)
    assert router.durable[0].table == TableName("My Schema", "Order; drop table x")
    assert router.durable[1].table == TableName("public", "orders")


# -- ops --------------------------------------------------------------------------------------


def test_ops_default_to_all_three_and_are_case_insensitive() -> None:
    router = Router()
    router.on("orders", name="all")(module_level_handler)
    router.on("orders", name="two", ops=("insert", "Update"))(module_level_handler)
    router.on_batch("orders", name="del", ops=["DELETE"])(batch_handler)
    ops = {h.name: h.ops for h in router.durable}
    assert ops == {
        "all": frozenset({"INSERT", "UPDATE", "DELETE"}),
        "two": frozenset({"INSERT", "UPDATE"}),
        "del": frozenset({"DELETE"}),
    }


def test_truncate_is_an_op_handlers_opt_into() -> None:
    router = Router()
    router.on("orders", name="rows")(module_level_handler)
    router.on("orders", name="all", ops=("insert", "UPDATE", "DELETE", "truncate"))(
        module_level_handler
    )
    ops = {h.name: h.ops for h in router.durable}
    assert ops == {
        "rows": frozenset({"INSERT", "UPDATE", "DELETE"}),  # TRUNCATE only when asked for
        "all": frozenset({"INSERT", "UPDATE", "DELETE", "TRUNCATE"}),
    }


@pytest.mark.parametrize("ops", [(), ("UPSERT",), ("INSERT", "UPSERT"), "INSERT"], ids=repr)
def test_invalid_ops_are_rejected(ops: object) -> None:
    router = Router()
    with pytest.raises(RouterError, match="ops"):
        router.on("orders", ops=ops, name="h")  # type: ignore[arg-type]
    assert router.durable == []


# -- keys, ordering, batches ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [(None, None), ("customer_id", ("customer_id",)), (("a", "b"), ("a", "b")), (["a"], ("a",))],
)
def test_key_accepts_a_column_or_a_tuple(key: object, expected: object) -> None:
    router = Router()
    router.on("orders", key=key, name="h")(module_level_handler)  # type: ignore[arg-type]
    assert router.durable[0].key == expected
    assert router.durable[0].ordered is True


def test_empty_key_tuple_is_rejected() -> None:
    with pytest.raises(RouterError, match="key"):
        Router().on("orders", key=(), name="h")


def test_ordered_false_and_batch_options() -> None:
    router = Router()
    router.on("orders", ordered=False, name="unordered")(module_level_handler)
    router.on_batch("orders", max_size=500, name="lines")(batch_handler)
    unordered, lines = router.durable
    assert (unordered.ordered, unordered.batch, unordered.max_size) == (False, False, 1)
    assert (lines.ordered, lines.batch, lines.max_size) == (True, True, 500)


@pytest.mark.parametrize("max_size", [0, -1, 1.5, "10"])
def test_batch_max_size_must_be_a_positive_integer(max_size: object) -> None:
    with pytest.raises(RouterError, match="max_size"):
        Router().on_batch("orders", max_size=max_size)  # type: ignore[arg-type]


def test_decorators_return_the_function_unchanged() -> None:
    router = Router()
    assert router.on("orders")(module_level_handler) is module_level_handler
    assert router.on_batch("orders")(batch_handler) is batch_handler
    assert router.on_notify("cache")(notify_handler) is notify_handler


# -- names ------------------------------------------------------------------------------------


def test_default_handler_name_is_module_and_qualname() -> None:
    router = Router()
    router.on("orders")(module_level_handler)
    router.on("orders")(Holder.nested)
    router.on_notify("cache")(notify_handler)
    module = module_level_handler.__module__
    assert [h.name for h in router.durable] == [
        f"{module}.module_level_handler",
        f"{module}.Holder.nested",
    ]
    assert router.notify[0].name == f"{module}.notify_handler"


def test_name_override() -> None:
    router = Router()
    router.on("orders", name="orders-v2:audit")(module_level_handler)
    assert router.durable[0].name == "orders-v2:audit"


@pytest.mark.parametrize("name", ["has space", "quote'd", "x" * 201, "new\nline", "ü"])
def test_unsafe_handler_names_are_rejected(name: str) -> None:
    with pytest.raises(RouterError, match="name"):
        Router().on("orders", name=name)(module_level_handler)


def test_handler_name_with_a_trailing_newline_is_rejected() -> None:
    with pytest.raises(RouterError, match="name"):
        Router().on("orders", name="audit\n")(module_level_handler)


def test_on_notify_channel_length() -> None:
    router = Router()
    router.on_notify("c" * 63, name="ok")(notify_handler)
    assert router.notify[0].channel == "c" * 63
    for channel in ("", "c" * 64):
        with pytest.raises(RouterError, match="channel"):
            router.on_notify(channel)


def test_include_merges_routers() -> None:
    a, b = Router(), Router()
    a.on("orders", name="a")(module_level_handler)
    b.on_notify("cache", name="b")(notify_handler)
    a.include(b)
    assert [h.name for h in a.durable] == ["a"]
    assert [h.name for h in a.notify] == ["b"]


def test_router_errors_are_configuration_errors() -> None:
    assert issubclass(RouterError, PgreactError)
    assert RouterError.exit_code == 2
    assert HandlerLoadError.exit_code == 2


# -- load_routers -----------------------------------------------------------------------------

ModuleFactory = Callable[[str], str]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleFactory]:
    """Write a uniquely named module under tmp_path (importable) and return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(source: str) -> str:
        name = f"pgreact_test_mod_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        created.append(name)
        return name

    yield make
    for name in created:
        sys.modules.pop(name, None)


HANDLERS_SOURCE = """
    from pgreact import Router

    router = Router()

    @router.on("public.orders")
    async def changed(event, session):
        pass

    @router.on_batch("lines", name="lines")
    async def lines(events, session):
        pass

    @router.on_notify("cache")
    async def invalidate(note):
        pass
"""


def test_load_routers_merges_modules(make_module: ModuleFactory) -> None:
    first = make_module(HANDLERS_SOURCE)
    second = make_module(
        """
        from pgreact import Router
        router = Router()

        @router.on("audit.log", name="audit")
        async def audit(event, session):
            pass
        """
    )
    router = load_routers([first, second])
    assert [h.name for h in router.durable] == [f"{first}.changed", "lines", "audit"]
    assert [h.name for h in router.notify] == [f"{first}.invalidate"]
    assert router.durable[2].table == TableName("audit", "log")


def test_duplicate_names_across_modules_are_rejected(make_module: ModuleFactory) -> None:
    first = make_module(HANDLERS_SOURCE)
    second = make_module(HANDLERS_SOURCE)  # defines another handler named "lines"
    with pytest.raises(RouterError, match="'lines'") as info:
        load_routers([first, second])
    assert "name=" in str(info.value)


def test_duplicate_names_within_one_module_are_rejected(make_module: ModuleFactory) -> None:
    module = make_module(
        """
        from pgreact import Router
        router = Router()

        @router.on("orders", name="same")
        async def one(event, session):
            pass

        @router.on_notify("cache", name="same")
        async def two(note):
            pass
        """
    )
    with pytest.raises(RouterError, match="'same'"):
        load_routers([module])


def test_the_same_module_twice_is_a_duplicate(make_module: ModuleFactory) -> None:
    module = make_module(HANDLERS_SOURCE)
    with pytest.raises(RouterError, match="two handlers"):
        load_routers([module, module])


def test_module_that_fails_to_import_is_named(make_module: ModuleFactory) -> None:
    module = make_module(
        """
        import pgreact_this_dependency_does_not_exist  # noqa: F401
        """
    )
    with pytest.raises(HandlerLoadError) as info:
        load_routers([module])
    message = str(info.value)
    assert repr(module) in message
    assert "pgreact_this_dependency_does_not_exist" in message  # the underlying cause
    assert "PGREACT_HANDLERS" in message
    assert info.value.exit_code == 2


def test_module_that_raises_on_import_is_named(make_module: ModuleFactory) -> None:
    module = make_module('raise RuntimeError("config missing at import time")\n')
    with pytest.raises(HandlerLoadError, match=module) as info:
        load_routers([module])
    assert "config missing at import time" in str(info.value)


def test_module_with_a_bad_registration_is_named(make_module: ModuleFactory) -> None:
    module = make_module(
        """
        from pgreact import Router
        router = Router()
        router.on("orders", ops=("UPSERT",), name="bad")
        """
    )
    with pytest.raises(PgreactError, match=module) as info:
        load_routers([module])
    assert "ops" in str(info.value)
    assert info.value.exit_code == 2


def test_missing_module_is_named() -> None:
    with pytest.raises(HandlerLoadError, match="'pgreact_no_such_module_xyz'"):
        load_routers(["pgreact_no_such_module_xyz"])


@pytest.mark.parametrize(
    "source", ["router = None\n", "from pgreact import Router\nrouters = Router()\n"]
)
def test_module_without_a_router_is_named(make_module: ModuleFactory, source: str) -> None:
    module = make_module(source)
    with pytest.raises(HandlerLoadError, match="router = Router") as info:
        load_routers([module])
    assert repr(module) in str(info.value)


def test_first_failing_module_stops_the_load(make_module: ModuleFactory) -> None:
    good = make_module(HANDLERS_SOURCE)
    with pytest.raises(HandlerLoadError, match="pgreact_no_such_module_abc"):
        load_routers([good, "pgreact_no_such_module_abc"])
