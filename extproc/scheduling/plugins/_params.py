"""Moved: the parameter readers are public in :mod:`extproc.plugin` (defined in ``extproc.scheduling.params``).
This module only keeps old imports working; new code imports from ``extproc.plugin``."""

from extproc.scheduling.params import check_keys, get_bool, get_float, get_int, get_seed, get_str, get_str_list

__all__ = ["check_keys", "get_bool", "get_float", "get_int", "get_seed", "get_str", "get_str_list"]
