"""The plugin core: one extension mechanism for everything.

``hookspecs`` declares one pluggy hook per component kind plus ``minidalle_stages`` and
``minidalle_commands``; ``registry`` holds what they register (components, stages, commands
and the config sections those own); ``discovery`` builds the registry (built-ins first, then
every entry point of the group ``minidalle``); ``builtins`` registers minidalle's own parts
through the same hooks, naming them as lazy ``"module:attr"`` strings. May import
``minidalle.config`` and ``minidalle.errors`` only; the code it registers is imported when used.
"""
