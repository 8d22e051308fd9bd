"""Check digits and letters of the identifiers schools and the NHS use (DESIGN.md, "Identifiers and codes").

Pure functions, no I/O, called a few hundred thousand times a run: validation works on ASCII bytes with
C-level `sum(map(...))` rather than a Python loop per character.

- NHS number: 10 digits; the tenth is a modulus-11 check digit over the first nine (weights 10..2);
  11 - (sum mod 11), where 11 becomes 0 and 10 means the nine digits can never be a valid NHS number.
  Validation takes the bare 10-digit string; `normalise_nhs_number` strips the spaces and hyphens people type.
- UPN (Unique Pupil Number, DfE): 13 characters. Character 1 is a check letter; 2-4 the LA code, 5-8 the
  establishment, 9-10 the year of allocation, 11-12 a serial, 13 a digit (permanent) or a letter (temporary
  UPN). Check letter = ALPHABET[(sum of value(char[i]) * i for i = 2..13) mod 23] with the 23-letter alphabet
  below; a digit's value is itself, a letter's its index in the alphabet. The LA code is not checked against
  a list: 999 is the DfE's test LA and synthetic data uses it.
- ULN (Unique Learner Number, DfE Learning Records Service): 10 digits, the first not 0. The tenth digit is
  10 - (sum of digit[i] * (10 - i) for i = 0..8) mod 11, where a remainder of 0 means no valid ULN exists for
  those nine digits. Rule as published in the LRS "ULN validation" note and implemented by the ESFA ILR
  validation service (DerivedData_01, ULN range 1000000000-9999999999).
"""

from __future__ import annotations

import bisect
import operator

UPN_ALPHABET = "ABCDEFGHJKLMNPQRTUVWXYZ"  # no I, O or S

_DIGIT_CHARS = "0123456789"
_UPN_LETTERS = frozenset(UPN_ALPHABET)
_UPN_LETTER_VALUE = {c: i for i, c in enumerate(UPN_ALPHABET)}
_UPN_LAST_VALUE = {**{d: int(d) for d in "0123456789"}, **_UPN_LETTER_VALUE}

_NHS_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)
_NHS_ZERO_BIAS = 48 * sum(_NHS_WEIGHTS)  # the weights applied to b"0" codes, removed in one subtraction
_UPN_WEIGHTS = tuple(range(2, 13))  # characters 2..12 (the digits); character 13 has weight 13
_UPN_ZERO_BIAS = 48 * sum(_UPN_WEIGHTS)
_ULN_WEIGHTS = _NHS_WEIGHTS  # digit i (0-based) has weight 10 - i
_ULN_ZERO_BIAS = _NHS_ZERO_BIAS

_mul = operator.mul


def _ascii_digits(s: str, n: int) -> bytes | None:
    """`s` as ASCII bytes if it is exactly `n` ASCII digits, else None (str.isdigit accepts '²' and '٣')."""
    if len(s) != n or not s.isascii() or not s.isdigit():
        return None
    return s.encode("ascii")


# NHS number -------------------------------------------------------------------------------------------------


def _nhs_check(first9: bytes) -> int | None:
    check: int = 11 - (sum(map(_mul, _NHS_WEIGHTS, first9)) - _NHS_ZERO_BIAS) % 11
    if check == 11:
        return 0
    if check == 10:
        return None
    return check


def nhs_number_check_digit(first9: str) -> int | None:
    """The check digit for the first nine digits of an NHS number; None if no valid number starts so.

    Raises ValueError unless `first9` is exactly nine ASCII digits.
    """
    b = _ascii_digits(first9, 9)
    if b is None:
        raise ValueError("an NHS number check digit needs exactly nine digits")
    return _nhs_check(b)


def is_valid_nhs_number(s: str) -> bool:
    """True if `s` is exactly ten ASCII digits whose last is the modulus-11 check digit of the first nine.

    No normalisation: pass the result of `normalise_nhs_number` for typed input such as '999 000 0018'.
    """
    b = _ascii_digits(s, 10)
    if b is None:
        return False
    return _nhs_check(b[:9]) == b[9] - 48


def normalise_nhs_number(s: str) -> str:
    """`s` without whitespace and hyphens ('999 000 0018', '999-000-0018' -> '9990000018'); not validated."""
    return "".join(s.split()).replace("-", "")


# Test NHS numbers (999 000 0000 - 999 999 9999) -------------------------------------------------------------

_TEST_PREFIX = "999"
_TEST_PREFIX_SUM = 9 * (10 + 9 + 8)
_TEST_FREE_WEIGHTS = (7, 6, 5, 4, 3, 2)  # the six digits after 999 that make up the first nine


def _residue_counts(weights: tuple[int, ...]) -> list[int]:
    """How many digit strings (one digit per weight) have each weighted sum mod 11."""
    counts = [1] + [0] * 10
    for w in weights:
        nxt = [0] * 11
        for r, c in enumerate(counts):
            if c:
                for d in range(10):
                    nxt[(r + w * d) % 11] += c
        counts = nxt
    return counts


# _TAIL_COUNTS[k][r]: strings over _TEST_FREE_WEIGHTS[k:] whose weighted sum is r mod 11.
_TAIL_COUNTS = [_residue_counts(_TEST_FREE_WEIGHTS[k:]) for k in range(len(_TEST_FREE_WEIGHTS) + 1)]


def _cumulative_valid(k: int, partial: int) -> tuple[int, ...]:
    """Running count, over digit d = 0..9 at free position k, of valid completions (total not 1 mod 11).

    A first nine whose weighted sum is 1 mod 11 has check 10 (no valid number), so it is skipped.
    """
    tail = _TAIL_COUNTS[k + 1]
    everything = sum(tail)
    running, out = 0, []
    for d in range(10):
        r = (partial + _TEST_FREE_WEIGHTS[k] * d) % 11
        running += everything - tail[(1 - r) % 11]
        out.append(running)
    return tuple(out)


_CUMULATIVE = [[_cumulative_valid(k, r) for r in range(11)] for k in range(len(_TEST_FREE_WEIGHTS))]
TEST_NHS_NUMBER_COUNT = _CUMULATIVE[0][_TEST_PREFIX_SUM % 11][-1]


def make_test_nhs_number(n: int) -> str:
    """The n-th (0-based) valid NHS number in the test range 9990000000-9999999999, in ascending order.

    First-nine-digit prefixes whose check digit would be 10 are skipped, so make_test_nhs_number(0) is
    '9990000018' (999000000 has no valid check digit). Deterministic and O(1) (a digit-by-digit search over
    precomputed counts), so a generator can call it for every pupil. There are TEST_NHS_NUMBER_COUNT
    (909,091) such numbers; any other n raises ValueError.
    """
    if not 0 <= n < TEST_NHS_NUMBER_COUNT:
        raise ValueError(f"n must be in 0..{TEST_NHS_NUMBER_COUNT - 1}")
    partial = _TEST_PREFIX_SUM % 11
    digits = []
    for k, w in enumerate(_TEST_FREE_WEIGHTS):
        cum = _CUMULATIVE[k][partial]
        d = bisect.bisect_right(cum, n)
        if d:
            n -= cum[d - 1]
        partial = (partial + w * d) % 11
        digits.append(_DIGIT_CHARS[d])
    first9 = _TEST_PREFIX + "".join(digits)
    check = 11 - (_TEST_PREFIX_SUM + sum(map(_mul, _TEST_FREE_WEIGHTS, map(int, digits)))) % 11
    return f"{first9}{0 if check == 11 else check}"


# UPN --------------------------------------------------------------------------------------------------------


def _upn_total(s: str) -> int | None:
    """Sum of value(char[i]) * i, i = 2..13, of a 13-character UPN; None if characters 2-13 are malformed."""
    mid = s[1:12]
    if not mid.isascii() or not mid.isdigit():
        return None
    last = _UPN_LAST_VALUE.get(s[12])
    if last is None:
        return None
    total: int = sum(map(_mul, _UPN_WEIGHTS, mid.encode("ascii"))) - _UPN_ZERO_BIAS + 13 * last
    return total


def upn_check_letter(twelve: str) -> str:
    """The check letter for characters 2-13 of a UPN: 11 digits, then a digit (or a letter: temporary UPN).

    Raises ValueError if `twelve` is not of that shape.
    """
    if len(twelve) != 12:
        raise ValueError("a UPN check letter needs the 12 characters that follow it")
    total = _upn_total("?" + twelve)
    if total is None:
        raise ValueError("UPN characters 2-12 must be digits and character 13 a digit or a UPN letter")
    return UPN_ALPHABET[total % 23]


def is_valid_upn(s: str) -> bool:
    """True if `s` is a 13-character UPN (permanent or temporary) with the right check letter.

    Strict: upper case, no surrounding spaces (normalise first with `normalise_upn`).
    """
    if len(s) != 13:
        return False
    total = _upn_total(s)
    return total is not None and UPN_ALPHABET[total % 23] == s[0]


def is_temporary_upn(s: str) -> bool:
    """True if `s` is a valid temporary UPN (13th character a letter rather than a digit)."""
    return is_valid_upn(s) and s[12] in _UPN_LETTERS


def normalise_upn(s: str) -> str:
    """`s` stripped and upper-cased (MIS exports sometimes carry 'a801200005001 '); not validated."""
    return s.strip().upper()


def make_upn(la: int, estab: int, serial: int, temporary: bool = False, *, year: int | None = None) -> str:
    """Build a valid UPN for synthetic data: LA code in characters 2-4, establishment in 5-8.

    Without `year`, characters 9-13 come from `serial`: a permanent UPN takes serial 0..99999 as five digits;
    a temporary one takes serial 0..229999 as four digits and a letter (serial // 23, then
    UPN_ALPHABET[serial % 23]). With `year`, characters 9-10 are year % 100 and the rest comes from `serial`
    (0..999 permanent, 0..2299 temporary). Distinct arguments give distinct UPNs (the check letter is a
    function of the other twelve characters). Raises ValueError on out-of-range arguments.
    """
    if not 0 <= la <= 999:
        raise ValueError("LA code must be 0..999")
    if not 0 <= estab <= 9999:
        raise ValueError("establishment number must be 0..9999")
    width = 5 if year is None else 3  # digits available after characters 2-8 (and 9-10 when year is given)
    lead = "" if year is None else f"{year % 100:02d}"
    if temporary:
        limit = 10 ** (width - 1) * 23
        if not 0 <= serial < limit:
            raise ValueError(f"temporary UPN serial must be 0..{limit - 1}")
        tail = f"{serial // 23:0{width - 1}d}{UPN_ALPHABET[serial % 23]}"
    else:
        limit = 10**width
        if not 0 <= serial < limit:
            raise ValueError(f"UPN serial must be 0..{limit - 1}")
        tail = f"{serial:0{width}d}"
    twelve = f"{la:03d}{estab:04d}{lead}{tail}"
    return upn_check_letter(twelve) + twelve


# ULN --------------------------------------------------------------------------------------------------------


def uln_check_digit(first9: str) -> int | None:
    """The ULN check digit for nine digits, or None where the remainder is 0 (no valid ULN).

    Raises ValueError unless `first9` is exactly nine ASCII digits.
    """
    b = _ascii_digits(first9, 9)
    if b is None:
        raise ValueError("a ULN check digit needs exactly nine digits")
    remainder: int = (sum(map(_mul, _ULN_WEIGHTS, b)) - _ULN_ZERO_BIAS) % 11
    return None if remainder == 0 else 10 - remainder


def is_valid_uln(s: str) -> bool:
    """True if `s` is a ten-digit ULN (first digit 1-9) with the right check digit (LRS rule, see above)."""
    b = _ascii_digits(s, 10)
    if b is None or b[0] == 48:
        return False
    remainder: int = (sum(map(_mul, _ULN_WEIGHTS, b[:9])) - _ULN_ZERO_BIAS) % 11
    return remainder != 0 and 10 - remainder == b[9] - 48
