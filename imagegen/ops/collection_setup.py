"""`imagegen setup-collection`: give the prompts collection the fields imagegen uses, changing nothing else.

The plan only adds: a missing field (status as a select with every value imagegen writes, error, images, and
the optional negative prompt, model, ratio, resolution and priority), and missing values to an existing status
select. It never removes, renames or retypes a field, and the update sends every existing field back as
PocketBase listed it, so their settings and the records' values stay. A collection that isn't there is
created with the fields. Run on a collection that has everything, the plan is empty. The local stack and the
test fixtures create their collection through this same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagegen.clients.layout import WRITTEN_STATUSES, FieldLayout
from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.clients.schema import CollectionSchema

# The field each role gets when it is added; text lengths leave room for long prompts and imagegen's errors.
NEW_FIELDS: dict[str, dict[str, Any]] = {
    "prompt": {"type": "text", "max": 20000},
    "negative_prompt": {"type": "text", "max": 20000},
    "image_url": {"type": "text", "max": 2000},
    "images": {"type": "json"},
    "status": {"type": "select", "maxSelect": 1, "values": [s.value for s in WRITTEN_STATUSES]},
    "error": {"type": "text", "max": 5000},
    "model": {"type": "text", "max": 100},
    "ratio": {"type": "text", "max": 100},
    "resolution": {"type": "text", "max": 100},
    "priority": {"type": "number", "onlyInt": True},
}
# A new collection's timestamps (PocketBase adds none by itself).
AUTODATES = [
    {"name": "created", "type": "autodate", "onCreate": True, "onUpdate": False},
    {"name": "updated", "type": "autodate", "onCreate": True, "onUpdate": True},
]


@dataclass
class SetupPlan:
    """What `setup-collection` would change: one line per change, and the fields to send."""

    collection: str
    create: bool = False
    changes: list[str] = field(default_factory=list)
    fields: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes

    def body(self) -> dict[str, Any]:
        """The JSON of the create (POST) or update (PATCH) request."""
        if self.create:
            # null rules: only superusers may list, view, create, update or delete
            rules = dict.fromkeys(("listRule", "viewRule", "createRule", "updateRule", "deleteRule"))
            return {"name": self.collection, "type": "base", **rules, "fields": self.fields}
        return {"fields": self.fields}


def _describe(name: str, spec: dict[str, Any]) -> str:
    detail = f"select: {', '.join(spec['values'])}" if spec["type"] == "select" else spec["type"]
    if spec.get("max"):
        detail += f", up to {spec['max']} characters"
    return f"add field {name} ({detail})"


def plan_setup(schema: CollectionSchema | None, layout: FieldLayout, collection: str) -> SetupPlan:
    """The additions that give the collection every field of `layout` (empty roles are left out)."""
    plan = SetupPlan(collection, create=schema is None)
    if schema is None:
        plan.changes.append(f"create collection {collection} (superuser-only rules)")
    kept = [dict(f) for f in schema.raw_fields] if schema is not None else []
    for role, name in layout.named().items():
        if not name:
            continue
        spec = NEW_FIELDS[role]
        found = schema.field(name) if schema is not None else None
        if found is None:
            kept.append({"name": name, **spec})
            plan.changes.append(_describe(name, spec))
        elif role == "status" and found.type == "select":
            missing = [v for v in spec["values"] if v not in found.values]
            if missing:
                entry = next(f for f in kept if f.get("name") == name)
                entry["values"] = [*found.values, *missing]
                plan.changes.append(f"add {', '.join(missing)} to the values of select {name}")
    if schema is None:
        kept.extend(AUTODATES)
    plan.fields = kept
    return plan


async def setup_collection(pocketbase: PocketBaseClient, layout: FieldLayout, *, apply: bool) -> SetupPlan:
    """Plan the additions the collection needs and, with `apply`, make them; returns the plan."""
    plan = plan_setup(await pocketbase.read_schema(), layout, pocketbase.collection)
    if apply and not plan.empty:
        await pocketbase.save_schema(plan.body(), create=plan.create)
    return plan
