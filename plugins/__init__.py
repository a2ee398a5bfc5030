"""Built-in cellmonitor plugins (installed as ``cellmonitor_plugins``): readers,
segmenters, encoders and sinks that adapt the outside world to
:mod:`monitor.protocols`."""
