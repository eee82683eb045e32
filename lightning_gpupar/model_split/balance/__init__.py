"""How ``placement="auto"`` balances a model over devices: by training memory (:mod:`.by_memory`, the
default) or by measured stage times (:mod:`.by_time`, ``balance="time"``)."""
