"""Where a command writes: checked before any work (the checks live with the run folder,
alexnet.runfolder, which the library's studies use too)."""

from alexnet.runfolder import check_output, inside_store, make_output_folder, refuse_store

__all__ = ["check_output", "inside_store", "make_output_folder", "refuse_store"]
