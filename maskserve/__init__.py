"""maskserve's command line: the launcher, ``demo``, ``experiment`` and the client commands.

It may import ``service``, ``client`` and ``trainer``; ``service`` never imports it.
"""
