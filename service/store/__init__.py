"""Redis: the key layout, the store client and its Lua scripts, the job scripts, durability, the embedded server.

May import ``service.core`` only.
"""
