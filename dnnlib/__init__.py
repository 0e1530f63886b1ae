"""Small utilities shared by the whole project: EasyDict, class construction, URL opening."""

from .util import EasyDict, construct_class_by_name, open_url  # noqa: F401
