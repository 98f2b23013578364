"""What ``minidalle run`` executes: ``stages`` (the stage runner and the built-in
``transformer`` stage) and one folder per recipe whose stages go beyond training the
transformer (``quickstart/``). Stages register through the ``minidalle_stages`` hook. May
import anything below ``commands`` (``train``, ``inference``, ``components``, ``config``).
"""
