"""The run layer: manifest rows planned into keyed jobs, handed to workers, recorded in the ledger.

It knows nothing of losses or optimisers: a worker hands each batch to the model layer and writes its files.
"""
