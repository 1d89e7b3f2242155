"""Generation options, checked in one place for `MedusaModel.generate`, `Session` and decode.py, and the seeding rule.

Seeding: a call with seed s draws batch j (or a Session's j-th generation) from `fold_in(PRNGKey(s), j)`, and each
row from that batch key, so no two (seed, batch, row) share a random stream. The same prompts, batch size and seed
give the same output; another batch size groups (and so seeds) the rows differently.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

ACCEPTANCE = ("greedy", "typical", "rejection")  # acceptance rules of the Medusa loop

SEED_LIMIT = 2**32  # PRNGKey keeps 32 bits of the seed: larger (or negative) seeds would alias smaller ones


class OptionError(ValueError):
    """A bad option. `str(e)` names it as the API does (`top_p`), `e.message(cli=True)` as decode.py (`--top-p`)."""

    def __init__(self, template: str, *names: str):
        self.template, self.names = template, names
        super().__init__(self.message())

    def message(self, cli: bool = False) -> str:
        return self.template.format(*(("--" + n.replace("_", "-")) if cli else n for n in self.names))


def _got(value) -> str:
    return repr(value).replace("{", "{{").replace("}", "}}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_at_least(name: str, v, low: int, what: str = "") -> None:
    if not _is_int(v) or v < low:
        raise OptionError(f"{{0}} must be an integer >= {low}{what}, got {_got(v)}", name)


def _unit(name: str, v, closed_low: bool) -> None:
    ok = _is_real(v) and (0 <= v <= 1 if closed_low else 0 < v <= 1)
    if not ok:
        raise OptionError(f"{{0}} must be in {'[' if closed_low else '('}0, 1], got {_got(v)}", name)


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Validated generation settings (raises `OptionError` on construction). batch_size None: the caller's default;
    acceptance None: rejection when sampling; lookup None: the default lookup chain."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int | None = None
    acceptance: str | None = None
    lookup: int | None = None
    topk: int = 10
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3

    def __post_init__(self):
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise OptionError(f"{{0}} must be a finite number >= 0 (0 = greedy), got {_got(t)}", "temperature")
        _unit("top_p", self.top_p, closed_low=False)
        _int_at_least("top_k", self.top_k, 0, " (0 = off)")
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise OptionError(f"{{0}} must be an integer in [0, 2**32), got {_got(self.seed)}", "seed")
        if self.batch_size is not None:
            _int_at_least("batch_size", self.batch_size, 1)
        if self.acceptance is not None:
            if self.acceptance not in ACCEPTANCE:
                raise OptionError(f"{{0}} must be one of {', '.join(ACCEPTANCE)}, got {_got(self.acceptance)}",
                                  "acceptance")  # fmt: skip
            if self.acceptance != "greedy" and t == 0:
                raise OptionError(
                    f"{{0}} {self.acceptance} needs {{1}} > 0 (at 0 decoding is greedy)", "acceptance", "temperature"
                )
        if self.lookup is not None:
            _int_at_least("lookup", self.lookup, 0, " (0 = no lookup chain)")
        _int_at_least("topk", self.topk, 1)
        _unit("posterior_threshold", self.posterior_threshold, closed_low=True)
        _unit("posterior_alpha", self.posterior_alpha, closed_low=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kw) -> GenerateOptions:
        """From keyword arguments of which only the option fields are read (others, e.g. `tree`, are ignored)."""
        return cls(**{f.name: kw[f.name] for f in dataclasses.fields(cls) if f.name in kw})


def batch_key(seed: int, index: int):
    """The PRNG key of batch `index` (or a Session's `index`-th generation) of a call seeded with `seed`."""
    import jax  # not at import: decode.py checks options before it loads JAX

    return jax.random.fold_in(jax.random.PRNGKey(seed), index)
