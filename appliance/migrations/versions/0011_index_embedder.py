"""The index records which embedder built its vectors in the database (the record of truth), not only in Chroma

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401  (columns use sqlmodel.sql.sqltypes)
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Filled on the next start from Chroma's collection metadata, where earlier versions kept it.
    with op.batch_alter_table("indexstate", schema=None) as batch_op:
        batch_op.add_column(sa.Column("embedder", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("indexstate", schema=None) as batch_op:
        batch_op.drop_column("embedder")
