"""The orchestrator: every change to a tracked tree is one command through one template.

The template (validate, intent, executor, records to the pipeline, namespace, answer) is
core.commands.template; the commands are grouped by what a reader looks for: names (mkdir,
create, symlink, mknod, link, unlink, rmdir), rename, attributes (setattr, xattrs, atime) and
content (a file's write, a new file's create). This class only gathers them under one name.
"""
from __future__ import annotations

from core.commands import attributes, content, names, rename
from core.commands.template import Template


class Orchestrator(Template):
    mkdir = names.mkdir
    create = names.create
    symlink = names.symlink
    mknod = names.mknod
    link = names.link
    unlink = names.unlink
    rmdir = names.rmdir
    rename = rename.rename
    setattr = attributes.setattr
    setxattr = attributes.setxattr
    removexattr = attributes.removexattr
    record_atime = attributes.record_atime
    write = content.write
    create_deferred = content.create_deferred
    finish_create = content.finish_create
