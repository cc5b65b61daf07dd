"""chunk vectors in the database, the index generation, and the FTS5 vocabulary view

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "indexstate",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("rebuilds", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "chunkvector",
        sa.Column("chunk_id", sa.String(length=80), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["chunk_id"], ["chunk.id"]),
        sa.PrimaryKeyConstraint("chunk_id"),
    )
    # Vectors indexed before this revision live only in Chroma: `appliance index check` reports them and
    # `appliance index rebuild` stores them here too.
    op.execute("INSERT INTO indexstate (id, generation, rebuilds) VALUES (1, 0, 0)")
    if op.get_bind().dialect.name == "sqlite":
        # Document frequencies of the stemmed terms, for leaving near-universal words out of BM25 queries.
        op.execute("CREATE VIRTUAL TABLE chunk_fts_vocab USING fts5vocab(chunk_fts, 'row')")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS chunk_fts_vocab")
    op.drop_table("chunkvector")
    op.drop_table("indexstate")
