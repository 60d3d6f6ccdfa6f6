"""How the app reads a path: a model's name may hold one ``/``, so its
converters leave the sub-resources of a model (and ``/jobs/from-yaml``) to
their own routes; a method a path does not take is 405 with exactly the
methods it does take."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quart.routing import QuartRule
from quart_trio import QuartTrio
from werkzeug.routing import BaseConverter, PathConverter

from protocol.names import RESERVED_SEGMENTS

from .responses import PUBLIC_BODY_MAX

__all__ = ["BareModelConverter", "DeviceConverter", "JobIdConverter", "ModelNameConverter", "new_app"]


class ModelNameConverter(PathConverter):
    """Everything up to the route's suffix, so that a bad name (``//x``,
    ``a/../b``) reaches the validator and gets a clear 400 instead of a
    redirect or a bare 404."""

    regex = ".+?"
    part_isolating = False


class DeviceConverter(BaseConverter):
    """A device segment that is not one of a model's sub-resources, so that
    ``/models/acme/locations/register`` is never read as the device
    ``register`` of the model ``acme``: it is the model ``acme/locations``
    (a name the validator refuses, its last segment being reserved)."""

    regex = "(?!(?:" + "|".join(sorted(RESERVED_SEGMENTS)) + ")(?:/|$))[^/]+"


class BareModelConverter(ModelNameConverter):
    """The model of ``/models/<model:name>`` alone: a path that ends in one
    of a model's sub-resources (``acme/m/register``, ``acme/m/services/n1``)
    belongs to that sub-resource's route, so a GET there is 405 with the
    methods that route takes, not the bad model name ``acme/m/register``."""

    regex = "(?:(?!/(?:" + "|".join(sorted(RESERVED_SEGMENTS)) + r")(?:/|\Z)).)+"


class JobIdConverter(BaseConverter):
    """A job id that is not ``from-yaml`` (``POST /jobs/from-yaml``'s path)."""

    regex = r"(?!from-yaml\Z)[^/]+"


class _Rule(QuartRule):
    """A route whose last variable could take a path another route owns gets
    a converter that leaves that path alone (``_OWNED``), so that a method a
    path does not take is 405 with exactly the methods it does take."""

    _OWNED: dict[tuple[str, str], type[BaseConverter]] = {
        ("/models/<model:name>", "name"): BareModelConverter,
        ("/jobs/<jid>", "jid"): JobIdConverter,
    }

    def get_converter(self, variable_name: str, converter_name: str, args: tuple[Any, ...],
                      kwargs: Mapping[str, Any]) -> BaseConverter:
        owned = self._OWNED.get((self.rule, variable_name))
        if owned is not None:
            return owned(self.map, *args, **kwargs)
        return super().get_converter(variable_name, converter_name, args, kwargs)


def new_app() -> QuartTrio:
    """An app with no routes yet that reads paths as above."""
    app = QuartTrio("meshnode")
    app.url_rule_class = _Rule
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.url_map.converters["model"] = ModelNameConverter
    app.url_map.converters["device"] = DeviceConverter
    app.config["MAX_CONTENT_LENGTH"] = PUBLIC_BODY_MAX
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    return app
