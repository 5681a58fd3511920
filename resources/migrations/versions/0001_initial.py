"""Initial schema: the tables create_all made before there were migrations.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-21 20:10:54.202035
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "operations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("executor", sa.String(length=200), nullable=False),
        sa.Column("resource_ref", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("failed_step", sa.String(length=200), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("error_traceback", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_operations_resource_ref"), "operations", ["resource_ref"], unique=False)
    op.create_index(op.f("ix_operations_status"), "operations", ["status"], unique=False)
    op.create_table(
        "outbox",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("operation_id", sa.String(length=32), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("throttle_scopes", sa.JSON(), nullable=True),
        sa.Column("release_throttle", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_outbox_created_at"), "outbox", ["created_at"], unique=False)
    op.create_index(op.f("ix_outbox_operation_id"), "outbox", ["operation_id"], unique=False)
    op.create_table(
        "service_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=150), nullable=False),
        sa.Column("backend", sa.String(length=50), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("uuid"),
    )
    op.create_table(
        "instances",
        sa.Column("flavor", sa.String(length=50), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=150), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "CREATION_SCHEDULED",
                "CREATING",
                "UPDATE_SCHEDULED",
                "UPDATING",
                "DELETION_SCHEDULED",
                "DELETING",
                "OK",
                "ERRED",
                name="state",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("runtime_state", sa.String(length=150), nullable=False),
        sa.Column("backend_id", sa.String(length=255), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("error_traceback", sa.Text(), nullable=False),
        sa.Column("action", sa.String(length=50), nullable=False),
        sa.Column("action_details", sa.JSON(), nullable=False),
        sa.Column("operation_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("modified_at", sa.DateTime(), nullable=False),
        sa.Column("service_settings_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["service_settings_id"], ["service_settings.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_instances_operation_id"), "instances", ["operation_id"], unique=False)
    op.create_index(op.f("ix_instances_service_settings_id"), "instances", ["service_settings_id"], unique=False)
    op.create_index(op.f("ix_instances_state"), "instances", ["state"], unique=False)
    op.create_index(op.f("ix_instances_uuid"), "instances", ["uuid"], unique=True)
    op.create_table(
        "operation_steps_done",
        sa.Column("operation_id", sa.String(length=32), nullable=False),
        sa.Column("path", sa.String(length=200), nullable=False),
        sa.Column("done_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["operation_id"], ["operations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("operation_id", "path"),
    )
    op.create_table(
        "volumes",
        sa.Column("size_gb", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=150), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "CREATION_SCHEDULED",
                "CREATING",
                "UPDATE_SCHEDULED",
                "UPDATING",
                "DELETION_SCHEDULED",
                "DELETING",
                "OK",
                "ERRED",
                name="state",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("runtime_state", sa.String(length=150), nullable=False),
        sa.Column("backend_id", sa.String(length=255), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("error_traceback", sa.Text(), nullable=False),
        sa.Column("action", sa.String(length=50), nullable=False),
        sa.Column("action_details", sa.JSON(), nullable=False),
        sa.Column("operation_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("modified_at", sa.DateTime(), nullable=False),
        sa.Column("service_settings_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"]),
        sa.ForeignKeyConstraint(["service_settings_id"], ["service_settings.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_volumes_instance_id"), "volumes", ["instance_id"], unique=False)
    op.create_index(op.f("ix_volumes_operation_id"), "volumes", ["operation_id"], unique=False)
    op.create_index(op.f("ix_volumes_service_settings_id"), "volumes", ["service_settings_id"], unique=False)
    op.create_index(op.f("ix_volumes_state"), "volumes", ["state"], unique=False)
    op.create_index(op.f("ix_volumes_uuid"), "volumes", ["uuid"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_volumes_uuid"), table_name="volumes")
    op.drop_index(op.f("ix_volumes_state"), table_name="volumes")
    op.drop_index(op.f("ix_volumes_service_settings_id"), table_name="volumes")
    op.drop_index(op.f("ix_volumes_operation_id"), table_name="volumes")
    op.drop_index(op.f("ix_volumes_instance_id"), table_name="volumes")
    op.drop_table("volumes")
    op.drop_table("operation_steps_done")
    op.drop_index(op.f("ix_instances_uuid"), table_name="instances")
    op.drop_index(op.f("ix_instances_state"), table_name="instances")
    op.drop_index(op.f("ix_instances_service_settings_id"), table_name="instances")
    op.drop_index(op.f("ix_instances_operation_id"), table_name="instances")
    op.drop_table("instances")
    op.drop_table("service_settings")
    op.drop_index(op.f("ix_outbox_operation_id"), table_name="outbox")
    op.drop_index(op.f("ix_outbox_created_at"), table_name="outbox")
    op.drop_table("outbox")
    op.drop_index(op.f("ix_operations_status"), table_name="operations")
    op.drop_index(op.f("ix_operations_resource_ref"), table_name="operations")
    op.drop_table("operations")
