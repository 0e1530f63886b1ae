"""Small utilities shared by the whole project: EasyDict, class construction, URL opening."""
